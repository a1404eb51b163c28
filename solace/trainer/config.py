"""Training configuration: YAML presets with command-line overrides, validated at start.

``load_config("configs/toy.yaml", ["grpo.rho=1.0", "train.seed=3"])`` merges the preset over the defaults
below (OmegaConf structured config: unknown keys and wrong types are rejected) and then checks every value,
raising :class:`~solace.errors.ConfigError` that names the field and the fix. Paper defaults (SOLACE on
Flow-GRPO) are the dataclass defaults; the authors' released-code departures are named switches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from solace.errors import ConfigError, check
from solace.evaluation.evaluators import EvalSetup, evaluator_kind
from solace.grpo.window import parse_steps, train_window
from solace.models import FAMILIES, ModelFamily, resolve_family
from solace.prompts import PROMPT_SETS, is_prompt_set, read_prompt_file
from solace.registry import load_plugins
from solace.rewards.mixture import COMPONENTS
from solace.rewards.registry import available_rewards, check_reward, reward_parameters
from solace.rewards.scorer import SelfConfidenceCfg, settings_with
from solace.trainer.precision import check_config as check_precision
from solace.trainer.updates import UPDATES
from solace.utils.seeding import check_seed


@dataclass
class LoraCfg:
    rank: int = 32
    alpha: float = 64.0
    target_modules: list[str] | None = None  # None: the adapter's own default list
    init_from: str | None = None  # start from an existing LoRA (e.g. Flow-GRPO-trained)
    merge_init: bool = False  # fold init_from into the base (KL reference = that model), train a fresh LoRA


@dataclass
class ModelCfg:
    # a name the model family loads: a diffusers folder or hub id (SD3/SD3.5, FLUX.1), an embedded world's
    # model or weights file; the default comes from solace/configs/defaults.yaml
    name: str = ""
    # the model family (solace.models.family): auto (from the pipeline's own class name in model_index.json,
    # a local folder's or the hub cache's) or a registered family's name (sd3, flux, a plugin's own)
    family: str = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # diffusers models
    # image size in pixels; 0: the model's own (toy 32 x 32, the only size it draws; SD3/FLUX 512 x 512).
    # resolution is shorthand for height = width (in the YAML file or command line that gives it; a height
    # or width given there too must agree); after loading it holds the side of a square size, else 0.
    height: int = 0
    width: int = 0
    resolution: int = 0
    text_encoder_3: bool = True  # SD3: load T5
    max_sequence_length: int = 256
    guidance_scale: float = 3.5  # FLUX.1-dev guidance embedding
    gradient_checkpointing: bool = False
    lora: LoraCfg = field(default_factory=LoraCfg)
    # memory (SD3/FLUX): prompt embeddings kept on disk (a folder, safetensors per prompt; "" none), the
    # prompts kept in memory, the text encoders moved to the CPU or freed once the run's prompts are encoded
    # ("free" needs embedding_cache), VAE decoding one image at a time / in tiles
    embedding_cache: str = ""
    embedding_lru_size: int = 4096
    offload_text_encoders: Literal["off", "cpu", "free"] = "off"
    vae_slicing: bool = False
    vae_tiling: bool = False


@dataclass
class DataCfg:
    # a registered prompt set (solace.prompts.PROMPT_SETS; the default is in configs/defaults.yaml) or a
    # .txt / .jsonl prompt file
    train_prompts: str = ""


@dataclass
class SamplingCfg:
    group_size: int = 16  # G images per prompt
    prompts_per_step: int = 2  # prompt groups per iteration (all processes together)
    num_steps: int = 10  # training sampler steps |T| (evaluations: eval.num_steps)
    cfg_scale: float = 7.0  # (evaluations and image grids: eval.cfg_scale)
    noise_level: float = 0.7  # Flow-GRPO's a in sigma_t = a sqrt(t/(1-t))
    sde_window_only: bool = False  # SDE only on the trained window (ODE elsewhere); Flow-GRPO: all steps
    # one initial noise per group (DanceGRPO); the paper and Flow-GRPO: a different initial noise per sample
    same_init_noise: bool = False
    batch_size: int = 32  # samples per sampling forward (per process; CFG doubles it)
    # the prompt whose embedding is CFG's null conditioning (training, evaluation and image grids): "" is
    # the empty prompt (the paper); the reward variants that use the null (cfg_in_reward, contrastive) see it
    negative_prompt: str = ""


@dataclass
class RewardComponent:
    # a registered component (solace.rewards.components.COMPONENTS: self_confidence, its settings in
    # reward.self_confidence), an image reward (solace.rewards.registry) or a factory package.module:function
    name: str = "self_confidence"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PremiseComponent:
    # a reward component scored for the log only (premise): its name and kwargs as in reward.components
    # (self_confidence's kwargs replace reward.self_confidence's settings, e.g. {contrastive: true}); label:
    # its log key, premise/<label>_auc (default: the name)
    name: str = "self_confidence"
    label: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0  # unused: never mixed into the reward


@dataclass
class PremiseCfg:
    """The paper's premise measured while the run trains, never trained on: each component scores a fixed
    slice of every ``every``-th training batch (each process's first prompt groups, ``groups`` in all) and
    the run logs its within-group AUC against the model's per-sample correctness ``label`` (a per-sample
    statistic of the family's batch statistics; the toy world: its exact evaluator's ``train/strict_acc``)."""

    components: list[PremiseComponent] = field(default_factory=list)
    groups: int = 2
    every: int = 1
    label: str = "train/strict_acc"


@dataclass
class RewardCfg:
    components: list[RewardComponent] = field(default_factory=lambda: [RewardComponent()])
    self_confidence: SelfConfidenceCfg = field(default_factory=SelfConfidenceCfg)


@dataclass
class GRPOCfg:
    rho: float = 0.6  # train on the last ceil(rho * |T|) reverse steps
    # explicit step indices to train instead of the rho suffix, e.g. "1,2" (Flow-GRPO-Fast-style early
    # window), or a released script's window: released_sd3 (4..8 of 10 steps) | released_flux (5..8 of 10)
    train_steps: str = ""
    beta: float = 0.04  # KL weight
    kl_form: Literal["flow_grpo", "exact"] = "flow_grpo"  # flow_grpo: no dt (Flow-GRPO's code)
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    global_std: bool = False  # divide by the std of the whole batch (Flow-GRPO's sample.global_std)
    # the CFG training forward with the unconditional branch detached (Flow-GRPO's compute_log_prob); the
    # paper and the released SOLACE code keep its gradient
    detach_uncond: bool = False
    # samples whose advantage is exactly 0 take no part in the update, KL included (Flow-GRPO's mask)
    drop_zero_advantages: bool = False


@dataclass
class NFTCfg:
    """DiffusionNFT's update (``train.algorithm: nft``). Defaults: the released code's where it states them
    (beta 1, A_max 5, adaptive weights, the sampler's grid of timesteps); the rest are ours."""

    beta: float = 1.0  # b of the implicit policies v+ = b v + (1-b) v_old, v- = (1+b) v_old - b v
    adv_max: float = 5.0  # A_max: r = clip(A, -A_max, A_max) / (2 A_max) + 1/2
    adaptive_weight: bool = True  # divide each term by its stop-gradient mean absolute x0 error
    timesteps: Literal["grid", "uniform"] = "grid"  # the sampler's sigmas, or U[t_min, t_max) then shift
    timesteps_per_sample: int = 2  # loss terms per sample and optimizer step (distinct on the grid)
    shift: float = 1.0  # uniform only: t = s u / (1 + (s - 1) u) (the model's resolution shift)
    t_min: float = 0.0
    t_max: float = 1.0
    # train only where Flow-GRPO does: the trained window (grpo.rho / grpo.train_steps, the last
    # ceil(rho |T|) reverse steps) restricts the grid's sigmas, or in uniform mode the range of t (then leave
    # t_min / t_max at 0 / 1); off: every timestep (DiffusionNFT)
    window: bool = False
    ema: Literal["constant", "ramp"] = "constant"  # the old policy's decay schedule
    ema_decay: float = 0.0  # constant: 0 = the policy at the start of the iteration
    ema_rate: float = 0.001  # ramp: d = min(rate * (step - delay), max) (released: 0.001, 0.5, 0)
    ema_max: float = 0.5
    ema_delay: int = 0
    kl_beta: float = 0.0  # weight of mean((v - v_ref)^2) to the LoRA-off base (released SD3.5-M: 1e-4)


@dataclass
class OptimCfg:
    lr: float = 3e-4
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class MonitorCfg:
    enabled: bool = True
    std_drop: float = 0.5  # warn when sample std falls below this fraction of its value at the start
    foreground_drop: float = 0.5  # toy world: warn when foreground fraction falls below this fraction
    reward_spike_z: float = 6.0  # warn when the reward mean jumps by this many running stds
    window: int = 5  # batch statistics: mean of the last N iterations against the mean of the first N
    accuracy_drop: float = 0.75  # warn when an evaluation's strict accuracy falls below this fraction of base


@dataclass
class EvalCfg:
    """Evaluation during training: before training (the base), every ``eval.every`` iterations and at the
    end, on ``eval.prompts`` (``eval.prompts_limit`` of them), ``eval.samples_per_prompt`` samples each,
    ``eval.num_steps`` ODE steps, CFG ``eval.cfg_scale``, the same initial noise every time (seed
    ``train.seed + 999``); and the image grids of fixed prompts (``eval.image_every``,
    ``eval.image_prompts``), drawn with the same sampler. See :mod:`solace.evaluation.evaluators`. Most of
    these settings lived in other sections before (:data:`MOVED_KEYS`)."""

    # a registered prompt set (solace.prompts.PROMPT_SETS; the default is in configs/defaults.yaml) or a
    # .txt / .jsonl prompt file
    prompts: str = ""
    prompts_limit: int = 0  # 0: all; a prompt set takes its own subset (e.g. round-robin over categories)
    every: int = 0  # 0: only before and after training
    samples_per_prompt: int = 4
    num_steps: int = 40  # ODE steps of evaluations and image grids
    cfg_scale: float = 0.0  # CFG of evaluations and image grids; 0: the same as sampling.cfg_scale
    # JSON file caching the evaluation before training (the base model), keyed by every setting it depends
    # on, so runs that share a base and seed (an ablation grid) evaluate it once; "" disables the cache
    base_cache: str = ""
    # image grid of fixed prompts (OUT/images/) at the start, every N iterations and at the end; 0: none
    image_every: int = 10
    image_prompts: list[str] = field(default_factory=list)  # []: the adapter's own, else training prompts
    # auto: registry metrics when eval.metrics names any, else the first registered evaluator that can score
    # eval.prompts on this model (solace.evaluation.evaluators.EVALUATORS), else none; metrics | none |
    # a registered evaluator's name force one
    evaluator: str = "auto"
    # registry metrics, as `solace eval --metrics` (clip_score, pickscore, hps, image_reward, aesthetic, ocr,
    # geneval, unified_reward, any registered reward); the LoRA-off base is evaluated once, then the trained
    # model
    metrics: list[str] = field(default_factory=list)
    # per metric, its factory's keywords, as `solace eval --metric-arg`: {clip_score: {model: /path}}
    metric_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 8  # metrics: images per generation and scoring batch (`solace eval --batch-size`)
    # metrics: prompts (rows) of each evaluation's base | current image grid (OUT/eval_images/); 0: none
    metric_grid_rows: int = 8


@dataclass
class LoraEMACfg:
    """An EMA of the trained LoRA that evaluations, image grids and the exported ``OUT/lora`` use (the trained
    weights go on training and are exported beside it, ``OUT/lora_trained``); kept in checkpoints. After
    optimizer step s it moves ``ema <- d ema + (1 - d) lora``, ``d = min((1 + s) / (10 + s), max_decay)``,
    when ``(s + 1) % every == 0``: the released SOLACE code's ``train.ema`` (``EMAModuleWrapper(decay=0.9,
    update_step_interval=8)``, :mod:`solace.nft.ema`)."""

    enabled: bool = False
    max_decay: float = 0.9
    every: int = 8


TRACKERS = ("tensorboard", "wandb")
"""Experiment trackers ``train.log_with`` may name (through accelerate's tracker API)."""


@dataclass
class TrainCfg:
    # the policy update, a registered name (solace.trainer.updates.UPDATES): flow_grpo (the paper's: PPO on
    # SDE step log-probs) | nft (DiffusionNFT: forward process, no log-probs) | a plugin's
    algorithm: str = "flow_grpo"
    iterations: int = 100
    # wall-clock budget for the training iterations (the evaluation before training not counted): the run
    # stops after the iteration that reaches it, then checkpoints, evaluates and reports as at the end;
    # 0: no limit. `--resume` continues it towards `iterations` with a fresh budget.
    max_minutes: float = 0.0
    # stop (non-zero exit, last checkpoint intact) after this many consecutive iterations with a non-finite
    # reward or gradient (those samples are dropped, those optimizer steps skipped); 0: never stop
    max_nonfinite: int = 3
    seed: int = 0
    output_dir: str = "runs/solace"
    # the policy update's batching (every train.algorithm): samples per training forward (per process),
    # passes over the iteration's samples, optimizer steps per pass (the samples split into this many)
    micro_batch_size: int = 8
    inner_epochs: int = 1
    updates_per_iteration: int = 1
    checkpoint_every: int = 10
    # keep the newest N intact checkpoints (the one --resume takes always among them), delete older ones;
    # 0: keep all. The exported LoRA (<output_dir>/lora) is never touched.
    checkpoints_total_limit: int = 0
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    report: bool = True
    # experiment trackers (accelerate): tensorboard (events in <output_dir>/tb) and/or wandb (pip install
    # 'solace[wandb]'; WANDB_MODE=offline works without an account); []: log.csv only
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = "solace"  # the wandb project (the run is named after train.output_dir)
    # several processes: how long one waits in a collective or barrier before the run fails; the others
    # wait in one while the main process writes checkpoints and the report alone (evaluations and grids
    # are split over the processes)
    process_group_timeout_minutes: float = 60.0
    # bf16: the denoiser's forwards under bf16 autocast (accelerate's mixed_precision), the LoRA and AdamW's
    # state float32; fp32: no autocast (accelerate's "no"); fp16 is refused (it needs a loss scaler); see
    # solace/trainer/precision.py
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True  # CUDA: float32 matmuls and convolutions in TensorFloat-32 (CPU: no effect)


@dataclass
class SolaceConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    sampling: SamplingCfg = field(default_factory=SamplingCfg)
    reward: RewardCfg = field(default_factory=RewardCfg)
    grpo: GRPOCfg = field(default_factory=GRPOCfg)
    nft: NFTCfg = field(default_factory=NFTCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    monitor: MonitorCfg = field(default_factory=MonitorCfg)
    premise: PremiseCfg = field(default_factory=PremiseCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    lora_ema: LoraEMACfg = field(default_factory=LoraEMACfg)
    # modules to import before anything is looked up by name (a user's own model family, reward ...), from
    # PYTHONPATH or an installed package; the solace.plugins entry points are always loaded
    plugins: list[str] = field(default_factory=list)
    preset: str = ""  # informational: the preset this config came from


DEFAULTS_FILE = "defaults.yaml"
"""The first layer of every config (``solace/configs/defaults.yaml``): the embedded world's default values."""


def presets_dir() -> Path:
    return Path(str(resources.files("solace").joinpath("configs")))


def resolve_preset(path_or_name: str) -> Path:
    """A YAML path, or the name of a bundled preset (``toy``, ``sd35m``, ``ablation/k4`` ...)."""
    p = Path(path_or_name)
    if p.exists():
        return p
    cand = presets_dir() / (path_or_name if path_or_name.endswith(".yaml") else path_or_name + ".yaml")
    if cand.exists():
        return cand
    names = sorted(
        str(q.relative_to(presets_dir()))[:-5]
        for q in presets_dir().rglob("*.yaml")
        if q.parent.name != "accelerate"  # accelerate's launch configs, not solace presets
        and q != presets_dir() / DEFAULTS_FILE  # the layer under every config, not a preset
    )
    raise ConfigError(
        "config", f"{path_or_name!r} is neither a file nor a preset; presets: {', '.join(names)}"
    )


PRESET_PATH_FIELDS = (("data", "train_prompts"), ("eval", "prompts"))  # (section, key)


def _anchor_preset_paths(raw: Any, path: Path) -> None:
    """A shipped preset names its prompt files relative to the repository (``data/prompts/...``): made
    absolute here, so the preset works from any folder. Only for presets of this package, and only where
    the file is there (an installed package without the repository keeps the name, and the check of
    ``data.train_prompts`` / ``eval.prompts`` says it is missing); a user's YAML and command-line overrides
    stay relative to the cwd."""
    root = presets_dir().resolve().parent.parent
    if presets_dir().resolve() not in path.parents:
        return
    for section, key in PRESET_PATH_FIELDS:
        value = raw[section].get(key) if OmegaConf.is_dict(raw.get(section)) else None
        if isinstance(value, str) and not Path(value).is_absolute() and (root / value).is_file():
            raw[section][key] = str(root / value)


MOVED_KEYS: dict[str, str] = {
    "data.eval_prompts": "eval.prompts",
    "data.eval_prompts_limit": "eval.prompts_limit",
    "sampling.eval_num_steps": "eval.num_steps",
    "sampling.eval_cfg_scale": "eval.cfg_scale",
    "train.eval_every": "eval.every",
    "train.eval_samples_per_prompt": "eval.samples_per_prompt",
    "train.base_eval_cache": "eval.base_cache",
    "train.image_every": "eval.image_every",
    "train.image_prompts": "eval.image_prompts",
    "eval.grid_prompts": "eval.metric_grid_rows",
    **{
        f"{update}.{key}": f"train.{key}"
        for update in ("grpo", "nft")
        for key in ("micro_batch_size", "inner_epochs", "updates_per_iteration")
    },
}
"""Keys of earlier versions and where they live now. Given in a YAML file, on the command line or in an
ablation condition they fail naming the new key (:func:`reject_moved_keys`); only a checkpoint's recorded
config is read through them (:func:`solace.trainer.resume_check.upgrade_recorded_config`)."""


def reject_moved_keys(layer: Any, where: str) -> None:
    """A config layer (a YAML file, the overrides, a condition) that sets a key of :data:`MOVED_KEYS` fails
    in one line naming the key that replaced it."""
    if not OmegaConf.is_dict(layer):
        return
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        node = layer.get(section, None)
        if OmegaConf.is_dict(node) and key in node:
            raise ConfigError(old, f"moved to {new}; rename it (in {where})")


def _load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """Load a YAML file; a top-level ``defaults: [other.yaml]`` list is merged underneath it."""
    path = path.resolve()  # ``a/../a/x.yaml`` is ``a/x.yaml``: a cycle through another spelling is a cycle
    check(path not in seen, "defaults", f"circular preset inheritance through {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError("config", f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, DictConfig):
        raw_type = "list" if isinstance(raw, ListConfig) else type(raw).__name__
        raise ConfigError(
            "config", f"{path}: the top level must be a mapping (section: settings), not a {raw_type}"
        )
    _anchor_preset_paths(raw, path)
    bases = raw.pop("defaults", []) if "defaults" in raw else []
    if not isinstance(bases, list | ListConfig) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("defaults", f"{path}: 'defaults' must be a list of preset names or YAML paths")
    reject_moved_keys(raw, str(path))
    raw = expand_resolution(raw, str(path))
    merged = OmegaConf.create()
    for b in bases:
        bp = (path.parent / b) if not Path(b).is_absolute() else Path(b)
        if not bp.exists():
            bp = resolve_preset(str(b))
        merged = OmegaConf.merge(merged, _load_yaml_chain(bp, (*seen, path)))
    return OmegaConf.merge(merged, raw)


def load_config(
    path: str | None = None,
    overrides: list[str] | None = None,
    check_paths: bool = True,
    layers_after: list[Any] | None = None,
) -> SolaceConfig:
    """Defaults (the dataclasses, then ``solace/configs/defaults.yaml``) <- preset YAML (with ``defaults:``
    inheritance) <- ``key=value`` overrides <- ``layers_after`` (OmegaConf configs, e.g. an ablation
    condition that must win over the overrides); the ``plugins`` imported; validated.

    ``check_paths=False`` skips the existence check of prompt files (to check a preset for another machine).
    """
    schema = OmegaConf.structured(SolaceConfig)
    layers = [schema, _load_yaml_chain(presets_dir() / DEFAULTS_FILE)]
    if path:
        p = resolve_preset(path)
        layers.append(_load_yaml_chain(p))
    for o in overrides or []:
        check("=" in o, "overrides", f"{o!r} is not of the form key=value (e.g. grpo.rho=1.0)")
    overrides = [_bracket_list(schema, o) for o in overrides or []]
    try:
        if overrides:
            dotlist = OmegaConf.from_dotlist(list(overrides))
            reject_moved_keys(dotlist, "the overrides")
            layers.append(expand_resolution(dotlist, "the overrides"))
        for layer in layers_after or []:
            reject_moved_keys(layer, "a config layer")
            layers.append(expand_resolution(layer, "a config layer"))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError(
            str(key), f"{msg} (see solace/trainer/config.py for the fields and their types)"
        ) from e
    cfg: SolaceConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    m = cfg.model
    m.resolution = m.height if m.height == m.width else 0  # the square side, never a stale shorthand
    if path:
        cfg.preset = cfg.preset or str(path)
    load_config_plugins(cfg.plugins)
    validate(cfg, check_paths)
    return cfg


def load_config_plugins(plugins: list[str]) -> None:
    """Import the modules of the ``plugins`` list (each a dotted module name, once), so that what they
    register is there before any name is looked up; a bad entry is one ConfigError naming ``plugins``."""
    for module in plugins:
        check(
            isinstance(module, str) and all(part.isidentifier() for part in module.split(".")),
            "plugins",
            f"{module!r} is not a module name; list dotted module names, e.g. plugins=[my_family]",
        )
    check(len(set(plugins)) == len(plugins), "plugins", f"names a module twice: {plugins}")
    load_plugins(plugins)


YAML_BOOL_WORDS = ("off", "on", "no", "yes", "y", "n", "true", "false")


def _bracket_list(schema: Any, override: str) -> str:
    """``key=a`` or ``key=a,b`` for a list field (e.g. ``train.log_with=wandb``) means ``key=[a,b]``; a word
    YAML reads as a boolean given to a string field (``model.offload_text_encoders=off``) is that string;
    other overrides are returned as they are."""
    key, _, value = override.partition("=")
    try:
        node = OmegaConf.select(schema, key.strip(), throw_on_missing=False)
    except OmegaConfBaseException:
        return override
    v = value.strip()
    if isinstance(node, ListConfig) and v and not v.startswith("[") and v.lower() not in ("null", "~"):
        return f"{key}=[{v}]"
    if isinstance(node, str) and v.lower() in YAML_BOOL_WORDS:  # a string field: `off` is "off", not False
        return f"{key}='{v}'"
    return override


def expand_resolution(layer: Any, where: str) -> Any:
    """``model.resolution: R`` in one layer (a YAML file, the overrides) is shorthand for ``model.height: R``
    and ``model.width: R`` in that layer, so a later layer's height or width wins as usual; a height or
    width the same layer gives must agree with R. Returns a new layer (the given one is not changed)."""
    model = layer.get("model", None) if OmegaConf.is_dict(layer) else None
    r = model.get("resolution", None) if OmegaConf.is_dict(model) else None
    if isinstance(r, str) and r.strip().isdigit():  # YAML "512": the schema would convert it
        r = int(r)
    if not isinstance(r, int) or isinstance(r, bool) or r == 0:
        return layer  # not given (0: the size is in height/width); a wrong type fails in the schema merge
    check(r > 0, "model.resolution", f"must be > 0 pixels (0: the model's own size), got {r}")
    for side in ("height", "width"):
        v = model.get(side, None)
        check(
            v in (None, 0, r),
            "model.resolution",
            f"{r} conflicts with model.{side}={v} in {where}: resolution sets both height and width; "
            "give either model.resolution or model.height and model.width",
        )
    return OmegaConf.merge(layer, {"model": {"height": r, "width": r}})


def to_yaml(cfg: SolaceConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _min(value: float, minimum: float, field: str, why: str = "") -> None:
    check(value >= minimum, field, f"must be >= {minimum:g}{why}, got {value}")


def _finite_fields(obj: Any, prefix: str = "") -> None:
    """Every float field (nested dataclasses, lists of them) is finite: inf or nan is never a setting."""
    for f in fields(obj):
        v, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if isinstance(v, float):
            check(math.isfinite(v), name, f"must be a finite number, got {v}")
        elif is_dataclass(v):
            _finite_fields(v, f"{name}.")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if is_dataclass(x):
                    _finite_fields(x, f"{name}[{i}].")


def validate(cfg: SolaceConfig, check_paths: bool = True) -> None:
    """Ranges and cross-field rules; the choice fields are checked by their Literal types. Errors name the
    field."""
    _finite_fields(cfg)
    s = cfg.sampling
    _min(s.group_size, 2, "sampling.group_size", " (GRPO compares samples)")
    _min(s.prompts_per_step, 1, "sampling.prompts_per_step")
    _min(s.num_steps, 1, "sampling.num_steps")
    _min(s.cfg_scale, 1.0, "sampling.cfg_scale", " (1 disables CFG)")
    if UPDATES.get(cfg.train.algorithm).needs_log_probs:
        check(
            s.noise_level > 0, "sampling.noise_level", f"must be > 0 for GRPO log-probs, got {s.noise_level}"
        )
    else:
        _min(s.noise_level, 0, "sampling.noise_level", " (0: the ODE sampler)")
    if cfg.train.algorithm == "nft":
        _validate_nft(cfg.nft, s.num_steps)
        _validate_nft_window(cfg)
    _min(s.batch_size, 1, "sampling.batch_size")
    _validate_size(cfg.model)
    cfg.reward.self_confidence.check(s.num_steps)
    check(len(cfg.reward.components) >= 1, "reward.components", "needs at least one reward")
    _validate_reward_names(cfg.reward.components, cfg)
    check(
        any(c.weight != 0 for c in cfg.reward.components),
        "reward.components",
        "every weight is 0: the reward would be constant and nothing trained; give a component a weight",
    )
    _validate_premise(cfg)
    _validate_grpo(cfg.grpo, s.num_steps)
    _validate_released_switches(cfg)
    o, t, lora = cfg.optim, cfg.train, cfg.model.lora
    _min(cfg.monitor.window, 1, "monitor.window")
    _validate_optim(o)
    _validate_memory(cfg.model)
    _min(lora.rank, 1, "model.lora.rank")
    check(lora.alpha > 0, "model.lora.alpha", f"must be > 0, got {lora.alpha}")
    _validate_train(t)
    _validate_trackers(t)
    _validate_eval(cfg.eval)
    if check_paths:
        _validate_prompt_files(cfg)
        _validate_evaluator(cfg)


def _validate_train(t: TrainCfg) -> None:
    """The ``train`` section's bounds (its trackers: :func:`_validate_trackers`)."""
    _min(t.iterations, 0, "train.iterations")
    check_seed(t.seed, "train.seed")
    _min(t.max_minutes, 0, "train.max_minutes", " (0: no limit)")
    _min(t.checkpoint_every, 1, "train.checkpoint_every")
    _min(t.checkpoints_total_limit, 0, "train.checkpoints_total_limit", " (0: keep every checkpoint)")
    _min(t.threads, 0, "train.threads", " (0: torch's default)")
    _min(t.max_nonfinite, 0, "train.max_nonfinite", " (0: never stop)")
    _min(t.micro_batch_size, 1, "train.micro_batch_size")
    _min(t.inner_epochs, 1, "train.inner_epochs")
    _min(t.updates_per_iteration, 1, "train.updates_per_iteration")
    check(
        t.process_group_timeout_minutes > 0,
        "train.process_group_timeout_minutes",
        f"must be > 0 minutes (longer than the longest checkpoint write or evaluation block), got "
        f"{t.process_group_timeout_minutes}",
    )
    check_precision(t.mixed_precision)


def _validate_optim(o: OptimCfg) -> None:
    """AdamW's bounds: a step divides by ``sqrt(v) + eps`` (eps 0 divides by zero where a gradient is 0),
    its moments average with weights ``beta`` in [0, 1), weight decay shrinks (never grows) the weights."""
    check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    check(o.max_grad_norm > 0, "optim.max_grad_norm", f"must be > 0, got {o.max_grad_norm}")
    check(o.eps > 0, "optim.eps", f"must be > 0 (AdamW divides by sqrt(v) + eps; 1e-8 is usual), got {o.eps}")
    for name, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        check(0 <= beta < 1, name, f"must be in [0, 1) (0.9 / 0.999 are usual), got {beta}")
    check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0 (0 turns it off), got {o.weight_decay}")


def _validate_trackers(t: TrainCfg) -> None:
    """``train.log_with`` names known trackers, each once (whether wandb is installed is checked when the
    trainer starts, on the machine that trains)."""
    for name in t.log_with:
        check(
            name in TRACKERS,
            "train.log_with",
            f"unknown tracker {name!r}; use a list of {', '.join(TRACKERS)} (e.g. [tensorboard,wandb]) or []",
        )
    check(len(set(t.log_with)) == len(t.log_with), "train.log_with", f"names a tracker twice: {t.log_with}")
    check(bool(t.tracker_project.strip()), "train.tracker_project", "must name the wandb project")


def _validate_eval(e: EvalCfg) -> None:
    """The ``eval`` section's bounds, and the metric list and its arguments checked against the registry
    (nothing is built, no model loads)."""
    _min(e.prompts_limit, 0, "eval.prompts_limit", " (0: all)")
    _min(e.every, 0, "eval.every", " (0: only before and after training)")
    _min(e.samples_per_prompt, 1, "eval.samples_per_prompt")
    _min(e.num_steps, 1, "eval.num_steps")
    check(
        e.cfg_scale == 0 or e.cfg_scale >= 1.0,
        "eval.cfg_scale",
        f"must be 0 (same as sampling.cfg_scale) or >= 1, got {e.cfg_scale}",
    )
    check(
        not (e.base_cache and Path(e.base_cache).is_dir()),
        "eval.base_cache",
        f"{e.base_cache} is a folder; name a .json file (or '' for no cache)",
    )
    _min(e.batch_size, 1, "eval.batch_size")
    _min(e.metric_grid_rows, 0, "eval.metric_grid_rows", " (0: no grid)")
    check(
        e.evaluator != "metrics" or bool(e.metrics),
        "eval.metrics",
        "eval.evaluator=metrics needs at least one metric, e.g. eval.metrics=[clip_score,pickscore]",
    )
    check(len(set(e.metrics)) == len(e.metrics), "eval.metrics", f"names a metric twice: {e.metrics}")
    known = available_rewards()
    for name in e.metrics:
        check(name in known, "eval.metrics", f"unknown metric {name!r}; available: {', '.join(known)}")
        params = reward_parameters(name)
        bad = sorted(set(e.metric_args.get(name, {})) - set(params))
        check(
            not bad or "**" in params,
            f"eval.metric_args.{name}",
            f"{name} takes no argument {', '.join(map(repr, bad))}; it takes {', '.join(params) or 'none'}",
        )
    for name in e.metric_args:
        check(
            name in e.metrics,
            "eval.metric_args",
            f"has arguments for {name!r}, which is not in eval.metrics ({', '.join(e.metrics) or 'empty'}); "
            f"add it to eval.metrics or remove its arguments",
        )


def eval_setup(cfg: SolaceConfig, cfg_scale: float | None = None) -> EvalSetup:
    """What the run's evaluation depends on (:class:`~solace.evaluation.evaluators.EvalSetup`), from the
    config; ``cfg_scale``: the evaluation CFG (default ``eval.cfg_scale`` or the sampling scale)."""
    m, e, s = cfg.model, cfg.eval, cfg.sampling
    family, fam = model_family_of(m)
    return EvalSetup(
        model=m.name,
        family=family,
        weights=fam.weights_file(m.name),
        prompts=e.prompts,
        limit=e.prompts_limit,
        evaluator=e.evaluator,
        metrics=tuple(e.metrics),
        metric_args={k: dict(v) for k, v in e.metric_args.items()},
        samples=e.samples_per_prompt,
        steps=e.num_steps,
        cfg_scale=cfg_scale if cfg_scale is not None else (e.cfg_scale or s.cfg_scale),
        seed=cfg.train.seed,
        negative_prompt=s.negative_prompt,
        batch_size=e.batch_size,
        grid_prompts=e.metric_grid_rows,
        cache_path=e.base_cache,
        starts_at_base=not (m.lora.init_from and not m.lora.merge_init),
        size=(m.height, m.width),
        key_settings={"lora_init": m.lora.init_from, "merge_init": m.lora.merge_init, "dtype": m.dtype},
        model_settings={
            "resolution": m.resolution,
            "max_sequence_length": m.max_sequence_length,
            "guidance_scale": m.guidance_scale,
            "text_encoder_3": m.text_encoder_3,
        },
    )


def _validate_evaluator(cfg: SolaceConfig) -> None:
    """Something can evaluate ``eval.prompts`` when evaluations are asked for (``eval.every``),
    and a forced evaluator fits the model and the prompts."""
    kind = evaluator_kind(eval_setup(cfg))
    if cfg.eval.every and kind == "none" and cfg.eval.evaluator != "none":
        raise ConfigError(
            "eval.every",
            f"nothing evaluates {cfg.eval.prompts!r} on {cfg.model.name!r}: name the metrics to "
            "evaluate with, e.g. eval.metrics=[clip_score,pickscore] (an embedded world's exact evaluator "
            "needs its own model and prompts), or set eval.every=0",
        )


def model_family_of(m: ModelCfg) -> tuple[str, ModelFamily]:
    """``(name, ModelFamily)`` of ``model.name`` / ``model.family`` (:func:`solace.models.resolve_family`):
    an unknown family, or an ``auto`` that cannot tell, is a ConfigError naming ``model.family``."""
    return resolve_family(m.name, m.family)


def _validate_size(m: ModelCfg) -> None:
    """Height and width are whole pixels >= 0 (0: the model's own) and follow the family's size rule as far
    as it is known before loading (a one-size family: that size); sizes on a pipeline's grid are checked
    against its VAE and patch size when the adapter loads."""
    name, family = model_family_of(m)
    family.sizes.check(name, {"model.height": m.height, "model.width": m.width})


def _validate_premise(cfg: SolaceConfig) -> None:
    """``premise``: logged components named like reward components, unique labels, a slice of at least one
    and at most the iteration's groups (whole groups per process are checked when the run knows its
    processes)."""
    p = cfg.premise
    if not p.components:
        return
    _validate_reward_names(p.components, cfg, "premise.components")
    labels = [c.label or c.name for c in p.components]
    check(
        len(set(labels)) == len(labels),
        "premise.components",
        f"two entries log under one label ({', '.join(labels)}); give each a distinct label",
    )
    for i, label in enumerate(labels):
        check(
            label.replace("_", "").replace("-", "").isalnum(),
            f"premise.components[{i}].label",
            f"{label!r} names a log key: letters, digits, _ and - only",
        )
    _min(p.groups, 1, "premise.groups")
    check(
        p.groups <= cfg.sampling.prompts_per_step,
        "premise.groups",
        f"is a slice of the iteration's {cfg.sampling.prompts_per_step} prompt groups, got {p.groups}",
    )
    _min(p.every, 1, "premise.every")
    check(bool(p.label), "premise.label", "name the per-sample correctness statistic, e.g. train/strict_acc")


def _validate_reward_names(
    components: list[RewardComponent] | list[PremiseComponent],
    cfg: SolaceConfig,
    where: str = "reward.components",
) -> None:
    """Every component names a reward whose factory resolves (a registered name, or a user factory
    ``package.module:function``, imported now) and accepts its kwargs: a typo, a missing module or function
    or a bad keyword fails in one line naming ``reward.components[i].name`` / ``.kwargs``, before any model
    loads."""
    for i, c in enumerate(components):
        check(bool(c.name), f"{where}[{i}].name", "must name a reward")
        if c.name == "self_confidence" and c.kwargs:  # they replace some of reward.self_confidence's settings
            field_ = f"{where}[{i}].kwargs"
            settings_with(cfg.reward.self_confidence, dict(c.kwargs), field_).check(
                cfg.sampling.num_steps, field_
            )
        elif c.name not in COMPONENTS:  # an image reward (a registered component takes its own settings)
            check_reward(c.name, dict(c.kwargs), f"{where}[{i}]")


def _validate_prompt_files(cfg: SolaceConfig) -> None:
    """Prompt files exist and read cleanly (one reader, :func:`solace.prompts.read_prompt_file`), so a bad
    file fails before anything is written; a registered prompt set's name stands for itself."""
    for name, src in (
        ("data.train_prompts", cfg.data.train_prompts),
        ("eval.prompts", cfg.eval.prompts),
    ):
        if not is_prompt_set(src):
            check(
                Path(src).exists(),
                name,
                f"prompt file {src!r} does not exist (use a .txt/.jsonl path or a prompt set: "
                f"{', '.join(PROMPT_SETS.names())})",
            )
            read_prompt_file(src, name)


def _validate_memory(m: ModelCfg) -> None:
    """The memory switches: for the families that read them (SD3/FLUX), a positive LRU size, ``free`` only
    with a disk cache."""
    _min(m.embedding_lru_size, 1, "model.embedding_lru_size")
    family, fam = model_family_of(m)
    switches = {
        "embedding_cache": bool(m.embedding_cache),
        "offload_text_encoders": m.offload_text_encoders != "off",
        "vae_slicing": m.vae_slicing,
        "vae_tiling": m.vae_tiling,
    }
    for name, on in switches.items():
        readers = ", ".join(n for n, f in FAMILIES.items() if name in f.settings) or "none"
        check(
            not on or name in fam.settings,
            f"model.{name}",
            f"applies to the model families that read it ({readers}), not to {family}; unset it",
        )
    check(
        m.offload_text_encoders != "free" or bool(m.embedding_cache),
        "model.offload_text_encoders",
        "free needs model.embedding_cache (a folder), so that prompts encoded before the encoders were "
        "freed can be read back; set it, or use cpu",
    )
    if m.embedding_cache:
        check(
            not Path(m.embedding_cache).is_file(),
            "model.embedding_cache",
            f"{m.embedding_cache} is a file; name a folder (created when missing)",
        )


def _validate_nft(n: NFTCfg, num_steps: int) -> None:
    check(n.beta > 0, "nft.beta", f"must be > 0, got {n.beta}")
    check(n.adv_max > 0, "nft.adv_max", f"must be > 0, got {n.adv_max}")
    _min(n.timesteps_per_sample, 1, "nft.timesteps_per_sample")
    if n.timesteps == "grid":
        check(
            n.timesteps_per_sample <= num_steps,
            "nft.timesteps_per_sample",
            f"asks for {n.timesteps_per_sample} distinct grid timesteps but sampling.num_steps = {num_steps}",
        )
    check(n.shift > 0, "nft.shift", f"must be > 0, got {n.shift}")
    check(0 <= n.t_min < n.t_max <= 1, "nft.t_min", f"need 0 <= t_min < t_max <= 1, got {n.t_min}, {n.t_max}")
    for name in ("ema_decay", "ema_max"):
        check(0 <= getattr(n, name) <= 1, f"nft.{name}", f"must lie in [0, 1], got {getattr(n, name)}")
    _min(n.ema_rate, 0, "nft.ema_rate")
    _min(n.ema_delay, 0, "nft.ema_delay")
    _min(n.kl_beta, 0, "nft.kl_beta")


def _validate_nft_window(cfg: SolaceConfig) -> None:
    """``nft.window``: the trained window fits the timestep mode (enough grid points for
    ``timesteps_per_sample``; one contiguous range of t, not also narrowed by ``t_min`` / ``t_max``)."""
    n, g, s = cfg.nft, cfg.grpo, cfg.sampling
    if not n.window:
        return
    steps = parse_steps(g.train_steps, s.num_steps) if g.train_steps else train_window(s.num_steps, g.rho)
    if n.timesteps == "grid":
        check(
            n.timesteps_per_sample <= len(steps),
            "nft.timesteps_per_sample",
            f"asks for {n.timesteps_per_sample} distinct timesteps but the trained window has {len(steps)} "
            f"steps ({steps}); lower it or widen grpo.rho",
        )
        return
    check(
        (n.t_min, n.t_max) == (0.0, 1.0),
        "nft.window",
        "sets the range of t from the trained window; leave nft.t_min / nft.t_max at 0 / 1 or turn it off",
    )
    check(
        sorted(steps) == list(range(min(steps), max(steps) + 1)),
        "nft.window",
        f"uniform timesteps need one contiguous window, grpo.train_steps gives {steps}",
    )


def _validate_released_switches(cfg: SolaceConfig) -> None:
    """The released-code switches that depend on other fields: the standardisation batches split the
    iteration, the probes' guidance is FLUX's, the zero-advantage filter is Flow-GRPO's, the EMA's ranges."""
    sc, s, prefix = cfg.reward.self_confidence, cfg.sampling, "reward.self_confidence"
    total = s.prompts_per_step * s.group_size
    if sc.standardize_batch:
        check(
            total % sc.standardize_batch == 0,
            f"{prefix}.standardize_batch",
            f"batches of {sc.standardize_batch} must split the iteration's {s.prompts_per_step} x "
            f"{s.group_size} = {total} samples",
        )
    m = min(sc.standardize_shuffle_groups, s.prompts_per_step)  # at most the iteration's groups
    if m:
        check(
            s.prompts_per_step % m == 0 and (m * s.group_size) % sc.standardize_batch == 0,
            f"{prefix}.standardize_shuffle_groups",
            f"runs of {m} groups must split sampling.prompts_per_step = {s.prompts_per_step}, and their "
            f"{m} x {s.group_size} samples split into batches of {sc.standardize_batch}",
        )
    if sc.probe_guidance:
        family, fam = model_family_of(cfg.model)
        check(
            "guidance_scale" in fam.settings,
            f"{prefix}.probe_guidance",
            f"sets FLUX's guidance embedding for the probes; the {family} family has none, set it to 0",
        )
    check(
        not cfg.grpo.drop_zero_advantages or cfg.train.algorithm == "flow_grpo",
        "grpo.drop_zero_advantages",
        "is Flow-GRPO's filter; under nft a zero advantage still trains (optimality 1/2): set it false",
    )
    e = cfg.lora_ema
    check(0 <= e.max_decay <= 1, "lora_ema.max_decay", f"must lie in [0, 1], got {e.max_decay}")
    _min(e.every, 1, "lora_ema.every")


def _validate_grpo(g: GRPOCfg, num_steps: int) -> None:
    check(0 < g.rho <= 1, "grpo.rho", f"must lie in (0, 1], got {g.rho}")
    if g.train_steps:
        try:
            steps = parse_steps(g.train_steps, num_steps)
        except ValueError as e:
            raise ConfigError("grpo.train_steps", str(e)) from None
        check(len(steps) > 0, "grpo.train_steps", "names no step")
    _min(g.beta, 0, "grpo.beta")
    check(g.clip_range > 0, "grpo.clip_range", f"must be > 0, got {g.clip_range}")
    check(g.adv_clip > 0, "grpo.adv_clip", f"must be > 0, got {g.adv_clip}")
    # advantages divide by std + adv_eps: 0 divides a flat group by zero, < 0 can flip or blow up the sign
    check(g.adv_eps > 0, "grpo.adv_eps", f"must be > 0 (1e-4 is the default), got {g.adv_eps}")
