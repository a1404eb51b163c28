"""The trainer under accelerate's FSDP on 2 CPU processes (gloo), against the same 2-process DDP run, in
float32 and in bf16.

One DDP launch and one FSDP launch of ``tests/run_fsdp_training.py`` (about 25 s and 35 s on 2 busy cores)
train the tiny toy model with flow_grpo and with nft (EMA decay 0.5, so the old policy is state of its
own; a gradient norm limit below its norms, so every step is clipped), evaluating and drawing an image grid
after every iteration (each process samples its block of them, padded under FSDP to as many forwards as
the others': every forward is a collective). Under FSDP the toy model's five
attention blocks, which hold all its LoRA layers, are FSDP units and their LoRA parameters real shards.

Tolerance of FSDP vs DDP: every forward, backward and AdamW step computes the same numbers elementwise, and
both average the two processes' gradients (FSDP divides each by 2 before its reduce-scatter, DDP the sum
after: exact in binary). Only the gradient norm is summed in another order (shard by shard), which moves
the weights only when clipping is active, by a rounding of the clip factor (~1e-7 relative) per step;
1e-5 on weights of size ~1 leaves room for that. Measured: weights, moments and old policy bitwise equal;
the clipped nft run's gradient norms differ by 6e-8 relative (0.0075489399 vs 0.0075489404). A clip by a
local norm (one process's shards) logs norms 5x off and fails here. A resumed run must equal the
uninterrupted one bitwise, as under DDP.

The tiny SD3 run (its transformer blocks wrapped as configs/accelerate/fsdp_sd3.yaml says) is not bitwise:
its forwards under FSDP agree with DDP's to float32 rounding only (self-confidence 1e-7 relative at
iteration 1, before any update), the group normalisation divides the rewards' differences by their spread
(0.027 here), and AdamW's first steps move a weight by about lr = 1e-2 whatever its gradient's size, so a
gradient near 0 turns rounding into visible changes: measured 7.9e-6 after 2 iterations. SD3_TOL = 1e-4 sits
above that and 100x below one optimizer step, the smallest effect of a real fault (a missing gradient
reduction, a wrong shard, a local clip norm).

bf16 (``OUT/bf16``): FSDP's mixed precision (bf16 weights for every forward and backward, float32 shards,
moments and gradient reductions) cannot match DDP's bf16 autocast bitwise: it rounds other tensors (every
weight, the norms' and biases' too, where autocast rounds the operands of matmuls and convolutions). Both are
bf16 arithmetic, each as far from float32 as the other: one velocity forward before training differs from
the float32 one by 1.60e-2 (FSDP) and 1.65e-2 (DDP) relative on the toy model, 6.55e-3 and 6.63e-3 on SD3.
So the yardstick of bf16 rounding is the same run in float32 (DDP fp32; FSDP fp32 computes it bitwise, see
above), and FSDP's bf16 must lie within BF16_FACTOR = 2 of it from DDP's bf16: two roundings of that size
are at most twice as far from each other (triangle inequality). Compared: the forward (measured 1.41e-2 vs
the yardstick's 1.65e-2 on the toy, 2.12e-3 vs 6.63e-3 on SD3) and the LoRA's change from its initial
weights after the first and the second update (toy 0.20 and 0.21 vs 0.18 and 0.23; SD3 0.034 and 0.029 vs
0.084 and 0.069: ratios 0.41 to 1.15). These runs set AdamW's eps to 1e-2, well above the gradients'
entries (about 2e-4), so that a step is lr * g / eps, linear in the gradient: with the usual 1e-8 the first
steps are lr * sign(g), and rounding flips the sign of every near-zero gradient entry (measured with 1e-8:
first updates 0.50 and 0.48 apart, final LoRA 2.6e-2 and 2.8e-2, bf16 and fp32 alike). Must fail: a flipped
sign (2.0) and a doubled gradient (1.0) lie outside the bound (at most 0.46), and FSDP in float32 (its
forward equal to DDP's fp32 bitwise) does not show the bf16 rounding that FSDP's bf16 must show (at least
half of DDP's autocast).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from trainer_helpers import make_tiny_toy_weights  # noqa: E402

SCRIPT = HERE / "run_fsdp_training.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LORA = Path("lora") / "pytorch_lora_weights.safetensors"
TOL = 1e-5
SD3_TOL = 1e-4
BF16_FACTOR = 2.0
FLIP_TOL = 3e-3
ALGORITHMS = ["flow_grpo", "nft"]


def _tiny_sd3_inputs(root: Path) -> list[str]:
    """A tiny SD3 pipeline (no T5), a prompt file and a tiny CLIP (CLIPScore offline), saved under root."""
    from test_external_rewards import tiny_clip_config, tiny_clip_tokenizer
    from tiny_pipelines import make_tiny_sd3, save_tiny_pipeline
    from transformers import CLIPModel

    pipe = save_tiny_pipeline(make_tiny_sd3(seed=0, with_t5=False), root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na cat left of a dog\n")
    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config(len(tok), tok.eos_token_id)).save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    return [str(pipe), str(prompts), str(root / "clip")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    weights = make_tiny_toy_weights(root / "tiny_toy.safetensors")
    sd3 = _tiny_sd3_inputs(root)
    for backend, port in (("ddp", "29541"), ("fsdp", "29542")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        cmd += [str(SCRIPT), str(weights), str(root / backend), backend, *sd3]
        subprocess.run(cmd, check=True, env=ENV, timeout=900, cwd=root)
    return root


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    assert all(a[k].shape == b[k].shape for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= tol, diff
    return diff


def _ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]


def _grad_norms(folder: Path) -> list[float]:
    with open(folder / "log.csv") as fh:
        return [float(row["train/grad_norm"]) for row in csv.DictReader(fh)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fsdp_shards_the_lora_and_trains_the_ddp_lora(runs, algorithm):
    ddp, fsdp = runs / "ddp" / algorithm / "full", runs / "fsdp" / algorithm / "full"
    assert not any(d["fsdp"] for d in _ranks(ddp))
    r0, r1 = _ranks(fsdp)
    assert r0["fsdp"] and r1["fsdp"] and r0["units"] == r1["units"] == 6  # the root + 5 attention blocks
    whole = r0["whole_numel"]
    assert r0["local_numel"] + r1["local_numel"] == whole and 0 < r0["local_numel"] < whole  # real shards
    a, b = load_file(str(ddp / LORA)), load_file(str(fsdp / LORA))
    _close(a, b, TOL)
    assert sum(v.numel() for v in b.values()) == whole  # the export holds whole tensors
    assert all(v.ndim == 2 and min(v.shape) == 4 for v in b.values())  # (rank, in) / (out, rank)
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 0  # it trained
    ck = Path("checkpoints") / "iter_000002"
    names = ["lora.safetensors", "optimizer.safetensors"] + ["update.safetensors"] * (algorithm == "nft")
    for name in names:
        _close(load_file(str(ddp / ck / name)), load_file(str(fsdp / ck / name)), TOL)
    assert _grad_norms(fsdp) == pytest.approx(_grad_norms(ddp), rel=TOL)
    # the evaluations and grids every process sampled (flow_grpo: report on, so also before and after)
    evals = json.loads((fsdp / "evals.json").read_text())
    assert [e["iteration"] for e in evals] == ([0, 1, 2] if algorithm == "flow_grpo" else [1])
    assert evals == json.loads((ddp / "evals.json").read_text())
    grids = sorted(p.name for p in (fsdp / "images").iterdir())
    assert grids == sorted(p.name for p in (ddp / "images").iterdir()) and "iter_000002.png" in grids
    # every process sampled its block of every evaluation and grid, as under DDP (FSDP's padding uncounted)
    shares = [d["sampled"] for d in (r0, r1)]
    assert shares == [d["sampled"] for d in _ranks(ddp)] and all(
        s["eval"] > 0 and s["grid"] > 0 for s in shares
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fsdp_checkpoint_resumes_to_the_uninterrupted_lora(runs, algorithm):
    """1 iteration (its checkpoint written under FSDP), then ``--resume`` to 2 in a new Trainer: bitwise the
    uninterrupted FSDP run, the optimizer moments and NFT's old policy included."""
    full, resumed = runs / "fsdp" / algorithm / "full", runs / "fsdp" / algorithm / "resumed"
    first = resumed / "checkpoints" / "iter_000001"
    assert json.loads((first / "state.json").read_text())["iteration"] == 1
    _close(load_file(str(full / LORA)), load_file(str(resumed / LORA)), 0.0)
    ck = Path("checkpoints") / "iter_000002"
    for name in ["optimizer.safetensors"] + (["update.safetensors"] * (algorithm == "nft")):
        _close(load_file(str(full / ck / name)), load_file(str(resumed / ck / name)), 0.0)
    if algorithm == "nft":  # whole tensors, and an old policy apart from the trained LoRA
        old = load_file(str(full / ck / "update.safetensors"))
        lora = load_file(str(full / ck / "lora.safetensors"))
        assert sorted(v.numel() for v in old.values()) == sorted(v.numel() for v in lora.values())
        b = [v for k, v in lora.items() if "lora_B" in k]
        assert not any(torch.equal(o, v) for o in old.values() for v in b if o.shape == v.shape)


def test_fsdp_trains_tiny_sd3_with_the_shipped_block_wrapping(runs):
    """The tiny SD3 transformer wrapped as configs/accelerate/fsdp_sd3.yaml says (each JointTransformerBlock a
    unit), CLIPScore evaluations and image grids on every process: the DDP run's LoRA within SD3_TOL."""
    ddp, fsdp = runs / "ddp" / "sd3", runs / "fsdp" / "sd3"
    r0, r1 = _ranks(fsdp)
    assert r0["units"] == r1["units"] == 3  # the root + the 2 transformer blocks
    whole = r0["whole_numel"]
    assert r0["local_numel"] + r1["local_numel"] == whole and 0 < r0["local_numel"] < whole
    a, b = load_file(str(ddp / LORA)), load_file(str(fsdp / LORA))
    assert all(k.startswith("transformer.transformer_blocks.") for k in b)  # diffusers' keys, no FSDP prefix
    _close(a, b, SD3_TOL)
    assert sum(v.numel() for v in b.values()) == whole
    assert _grad_norms(fsdp) == pytest.approx(_grad_norms(ddp), rel=TOL)
    ev_d, ev_f = (json.loads((d / "evals.json").read_text()) for d in (ddp, fsdp))
    assert [e["iteration"] for e in ev_f] == [0, 1, 2]
    for x, y in zip(ev_d, ev_f, strict=True):
        # FSDP pads rank 1's block of the 3 prompts (a batch of 2 where DDP samples 1): its rounding may flip
        # an 8-bit level (test_ddp_runs.py: FLIP_TOL); equal here
        assert y["metrics"]["clip_score"] == pytest.approx(x["metrics"]["clip_score"], rel=1e-4, abs=FLIP_TOL)
    grids = sorted(p.name for p in (fsdp / "eval_images").iterdir())  # written by the main process
    assert grids == [f"iter_00000{i}.png" for i in range(3)]


def _probe(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "probe.safetensors"))


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _change(folder: Path, iteration: int) -> torch.Tensor:
    """The LoRA's change from its initial weights to checkpoint ``iteration``, flattened in key order."""
    init = {k.removeprefix("init."): v for k, v in _probe(folder).items() if k.startswith("init.")}
    now = load_file(str(folder / "checkpoints" / f"iter_{iteration:06d}" / "lora.safetensors"))
    assert now.keys() == init.keys()
    return torch.cat([(now[k].double() - init[k].double()).flatten() for k in sorted(now)])


def within_bf16_rounding(x: torch.Tensor, ref: torch.Tensor, yardstick: torch.Tensor) -> bool:
    """``x`` deviates from ``ref`` (DDP's bf16) by at most BF16_FACTOR times what float32 arithmetic
    (``yardstick``, the same run in fp32) does: the measured effect of bf16 rounding on that quantity."""
    return _rel(x, ref) <= BF16_FACTOR * _rel(yardstick, ref)


def bf16_took_effect(x: torch.Tensor, fp32: torch.Tensor, ddp_bf16: torch.Tensor) -> bool:
    """``x`` differs from the float32 forward by at least half of what DDP's bf16 autocast does."""
    return _rel(x, fp32) >= 0.5 * _rel(ddp_bf16, fp32)


@pytest.mark.parametrize("model", ["flow_grpo", "sd3"])
def test_fsdp_bf16_mixed_precision_trains_the_ddp_bf16_lora_within_bf16_rounding(runs, model):
    """FSDP's mixed precision (bf16 compute, float32 shards, moments and gradient reductions) against DDP's
    bf16 autocast, with DDP in float32 as the yardstick of bf16 rounding (module docstring)."""
    d16, f16, d32 = (
        runs / b / "bf16" / p / model for b, p in (("ddp", "bf16"), ("fsdp", "bf16"), ("ddp", "fp32"))
    )
    for doc in _ranks(f16):
        assert doc["fsdp"] and doc["policy"] == {
            "param_dtype": "torch.bfloat16",
            "reduce_dtype": "torch.float32",
            "buffer_dtype": "torch.float32",
            "cast_root_forward_inputs": False,
        }
        assert doc["stored"]["lora"] == doc["stored"]["moments"] == ["torch.float32"]
    assert [e["iteration"] for e in json.loads((f16 / "evals.json").read_text())] == [0, 1, 2]
    assert (f16 / "images" / "iter_000002.png").exists()
    # one forward before training: bf16 rounding, and no more than DDP's autocast shows
    v16, v32, vf = (_probe(f)["velocity"] for f in (d16, d32, f16))
    assert bf16_took_effect(vf, v32, v16) and within_bf16_rounding(vf, v16, v32)
    fsdp32 = runs / "fsdp" / ("flow_grpo/full" if model == "flow_grpo" else "sd3")
    assert not bf16_took_effect(_probe(fsdp32)["velocity"], v32, v16)  # must fail: FSDP in float32
    # the first update and the change after 2 iterations
    for it in (1, 2):
        x, ref, yard = (_change(f, it) for f in (f16, d16, d32))
        assert x.abs().max() > 0 and within_bf16_rounding(x, ref, yard), (it, _rel(x, ref), _rel(yard, ref))
        for wrong in (-x, 2 * x):  # must fail: a flipped sign, a doubled gradient
            assert not within_bf16_rounding(wrong, ref, yard)


def test_lora_left_in_the_root_fsdp_unit_is_refused_naming_the_field(runs):
    """Wrapping the toy's ResBlocks leaves its LoRA (in the attention blocks) in the root unit, whose gathered
    weights FSDP keeps between forwards (the EMA swap and AdamW write the shards): refused, every process."""
    for r in (0, 1):
        msg = (runs / "fsdp" / f"root_unit_error_rank{r}.txt").read_text()
        assert msg.startswith("accelerate config fsdp_config.fsdp_transformer_layer_cls_to_wrap: 60 LoRA")
        assert "name the block classes that hold the LoRA layers" in msg


def test_fsdp_setup_errors_name_the_field_and_the_fix():
    """The plugin's version and use_orig_params; a bf16 base beside float32 LoRA (FSDP version 1 flattens
    a unit into one dtype: torch's ``_validate_tensors_to_flatten`` would fail inside prepare)."""
    from types import SimpleNamespace

    from solace.errors import ConfigError
    from solace.trainer.fsdp import prepare_plugin

    with pytest.raises(ConfigError, match=r"fsdp_version: is 2; .*set fsdp_version: 1"):
        prepare_plugin(SimpleNamespace(fsdp_version=2, use_orig_params=True, ignored_modules=None), [])
    with pytest.raises(ConfigError, match=r"fsdp_use_orig_params: is false; set it to true"):
        prepare_plugin(SimpleNamespace(fsdp_version=1, use_orig_params=False, ignored_modules=None), [])
    from solace.models.lora import add_lora
    from solace.trainer.fsdp import check_uniform_dtype

    base = torch.nn.Sequential(torch.nn.Linear(4, 4)).to(torch.bfloat16)
    base.requires_grad_(False)
    add_lora(base, 2, 2, ["0"])  # float32 LoRA beside the bf16 base, as model.dtype=bf16 gives
    mixed = r"model.dtype: the denoiser holds bfloat16, float32 .*fp32 with train.mixed_precision=bf16"
    with pytest.raises(ConfigError, match=mixed):
        check_uniform_dtype(base, [])
    check_uniform_dtype(base.float(), [])
    text = torch.nn.Linear(2, 2)
    plugin = SimpleNamespace(fsdp_version=1, use_orig_params=True, ignored_modules=[torch.nn.Linear(1, 1)])
    prepare_plugin(plugin, [text])
    assert plugin.ignored_modules == [text]  # an earlier run's list is replaced (solace ablate)
    assert plugin.mixed_precision_policy is None  # fp32: FSDP's full precision


def test_fsdp_bf16_policy_computes_in_bf16_and_reduces_in_float32():
    """accelerate's policy for ``mixed_precision: bf16`` (bf16 everywhere, root inputs cast) is replaced."""
    from types import SimpleNamespace

    from accelerate import FullyShardedDataParallelPlugin

    from solace.errors import ConfigError
    from solace.trainer.fsdp import mixed_precision_policy, prepare_plugin

    assert mixed_precision_policy("no") is None
    with pytest.raises(ConfigError, match=r"^train.mixed_precision: fp8 under FSDP"):
        mixed_precision_policy("fp8")
    accelerates = FullyShardedDataParallelPlugin(fsdp_version=1, mixed_precision_policy="bf16")
    acc_mp = accelerates.mixed_precision_policy
    assert acc_mp.reduce_dtype == acc_mp.buffer_dtype == torch.bfloat16 and acc_mp.cast_root_forward_inputs
    plugin = SimpleNamespace(fsdp_version=1, use_orig_params=True, ignored_modules=None,
                             mixed_precision_policy=acc_mp)  # fmt: skip
    prepare_plugin(plugin, [], "bf16")
    mp = plugin.mixed_precision_policy
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,
    )
    assert not mp.cast_root_forward_inputs  # the timestep stays float32 (t * 1000 = 937.5 would be 936)
    assert torch.tensor(937.5).to(torch.bfloat16).item() == 936.0
    prepare_plugin(plugin, [], "no")  # a later fp32 run in the same process (solace ablate)
    assert plugin.mixed_precision_policy is None
