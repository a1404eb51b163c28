"""The model card written beside an exported LoRA (``OUT/lora/README.md``): what it was trained from and
how, and the lines that load it, so a LoRA copied elsewhere still says what it is. Written with
huggingface_hub's ``ModelCard`` (its YAML metadata block is what the Hub and diffusers tooling read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def card_text(cfg: Any, folder: Path, pipeline_class: type | None, evals: list[dict[str, Any]]) -> str:
    """The card's Markdown (metadata block included) for the LoRA in ``folder`` trained with ``cfg``."""
    from huggingface_hub import ModelCard, ModelCardData

    base = cfg.model.name
    data = ModelCardData(
        base_model=base if pipeline_class is not None else None,
        library_name="diffusers" if pipeline_class is not None else None,
        tags=["lora", "solace", "text-to-image", "reinforcement-learning"],
    )
    rewards = ", ".join(f"{c.name} x {c.weight}" for c in cfg.reward.components)
    lora = cfg.model.lora
    init = lora.init_from if lora.init_from and lora.merge_init else None  # this LoRA's base: init folded in
    load = load_lines(base, folder, pipeline_class, init)
    lines = [
        f"# LoRA for `{base}` trained with solace",
        "",
        f"- update: {cfg.train.algorithm}; rewards: {rewards}; iterations: {cfg.train.iterations}; "
        f"seed: {cfg.train.seed}; preset: `{cfg.preset or '-'}`",
        f"- LoRA: rank {cfg.model.lora.rank}, alpha {cfg.model.lora.alpha} (stored in the weights' metadata, "
        "so loaders apply the trained scale); learning rate "
        f"{cfg.optim.lr}",
        f"- sampling: G = {cfg.sampling.group_size}, {cfg.sampling.num_steps} steps, "
        f"CFG {cfg.sampling.cfg_scale}",
    ]
    if init:
        bare = (
            "" if pipeline_class is not None else " (`solace sample --lora` alone shows it on the bare base)"
        )
        lines.append(
            f"- trained on top of the LoRA `{init}` folded into the base (`model.lora.merge_init`): "
            f"this LoRA acts on that model, so fold that one in first{bare}"
        )
    if evals:
        first, last = evals[0], evals[-1]
        shown = {k: v for k, v in last.items() if isinstance(v, int | float) and k != "iteration"}
        lines.append(
            f"- evaluation (iteration {first['iteration']} -> {last['iteration']}): "
            + ", ".join(
                f"{k} {first.get(k, float('nan')):.3f} -> {v:.3f}" for k, v in list(shown.items())[:4]
            )
        )
    lines += [
        "",
        "Load it:",
        "",
        load,
        "",
        "The run's own record: `config.yaml`, `report.md` beside `lora/`.",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def load_lines(base: str, folder: Path, pipeline_class: type | None, init: str | None) -> str:
    """The card's code block that loads the LoRA in ``folder``: diffusers lines for a pipeline (``init``, the
    LoRA it was trained on top of, folded in first), else ``solace sample``."""
    if pipeline_class is None:
        return f'```bash\nsolace sample --model {base} --lora {folder} -p "a photo of a circle"\n```'
    fold = (
        f'pipe.load_lora_weights("{init}", adapter_name="init")  # this LoRA was trained on top of it\n'
        "pipe.fuse_lora(adapter_names=[\"init\"])  # folded into the base, as in training\n"
        "pipe.unload_lora_weights()\n"
    ) if init else ""  # fmt: skip
    return (
        "```python\n"
        f"from diffusers import {pipeline_class.__name__}\n\n"
        f'pipe = {pipeline_class.__name__}.from_pretrained("{base}")\n'
        f"{fold}"
        f'pipe.load_lora_weights("{folder}")\n'
        "```"
    )


def write_card(cfg: Any, folder: Path, pipeline_class: type | None, evals: list[dict[str, Any]]) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(card_text(cfg, Path(folder), pipeline_class, evals))
    return path
