"""Training under accelerate's FSDP (version 1, ``use_orig_params``): the LoRA parameters are shards.

With ``use_orig_params`` each trained (LoRA) parameter stays the same ``nn.Parameter`` object, but outside a
forward it holds only this process's piece of the FSDP unit's flat parameter: a 1-D view, empty where the
piece lies on another process. Whatever is elementwise works on these pieces unchanged (AdamW's step,
DiffusionNFT's EMA update and its swap into the parameters); whatever needs whole tensors goes through
:class:`ShardedParams`, which every process must call in the same order (each call is a collective):

* :meth:`ShardedParams.full` / :meth:`ShardedParams.local`: per-parameter pieces (EMA copies, Adam moments)
  to whole tensors and back, by putting the pieces into the parameters and gathering them with
  ``FSDP.summon_full_params`` (every unit is gathered at once: the whole model is materialised on each
  process for the duration, as FSDP's FULL_STATE_DICT does; checkpoints, exports and resume only);
* :meth:`ShardedParams.summoned`: the LoRA state dict, exports and LoRA loading on whole tensors;
* :meth:`ShardedParams.clip_grad_norm_`: the global norm over every shard (the root FSDP module's own
  ``clip_grad_norm_``), where ``torch.nn.utils.clip_grad_norm_`` would see a local piece only.

Writes into the pieces reach the next forward only when their unit's gathered copy was freed after the
previous forward, which FSDP does for every unit but the root: :func:`check_lora_units` therefore
requires every LoRA parameter to live in a wrapped block (``fsdp_transformer_layer_cls_to_wrap``).

bf16 (``train.mixed_precision=bf16``, the shipped configs' ``mixed_precision: bf16``): FSDP's own mixed
precision (:func:`mixed_precision_policy`). The shards stay float32 (the frozen base, the LoRA master
weights, hence AdamW's moments and DiffusionNFT's old policy); each unit's shard is cast to bf16 before its
all-gather, so the forward and backward compute with bf16 weights, under accelerate's bf16 autocast as in a
DDP run; the LoRA gradients are cast to float32 before the reduce-scatter. The base is stored in float32
(``model.dtype=fp32``): FSDP version 1 flattens a unit's parameters into one tensor of one dtype, so a base
stored in bf16 beside the float32 LoRA in the same block cannot be wrapped (:func:`check_uniform_dtype`).
Putting every LoRA layer in a unit of its own would allow it, at the price of one more all-gather per
LoRA layer and forward and one more reduce-scatter per backward (SD3.5-M: 24 blocks x 8 projections, 192
small, latency-bound collectives each way), to save half of a shard that is already 1/N of the base
(float32 on 8 GPUs: SD3.5-M 1.04 GiB a GPU, FLUX.1-dev 5.5 GiB; bf16 would save half of that).
The arithmetic is the same either way: a float32 weight cast to bf16 at each gather rounds as a base cast
to bf16 once (``model.dtype=bf16``) does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from solace.errors import ConfigError

WRAP_FIELD = "accelerate config fsdp_config.fsdp_transformer_layer_cls_to_wrap"


def is_fsdp(module: Any) -> bool:
    """Whether ``module`` is wrapped by torch's FSDP (version 1)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def mixed_precision_policy(precision: str) -> Any:
    """torch FSDP's ``MixedPrecision`` for accelerate's ``precision`` (``no``: None, full precision). bf16:

    * ``param_dtype`` bf16: each unit's float32 shard cast to bf16 for its all-gather, forward and backward
      (the memory and the tensor cores of a bf16 model; the shards, the LoRA master weights, stay float32);
    * ``reduce_dtype`` float32: the LoRA gradients (computed in bf16) cast to float32 before the
      reduce-scatter, so they are summed as DDP sums its float32 buckets; accelerate's own policy for bf16
      reduces in bf16 (8 bits of mantissa for a sum over N processes);
    * ``buffer_dtype`` float32: the buffers are constants (SD3's ``pos_embed``) that DDP's autocast keeps in
      float32;
    * ``cast_root_forward_inputs`` off: FSDP would cast the denoiser's float inputs to bf16, the timestep
      among them (t * 1000 = 937.5 becomes 936), which autocast never does (it casts the operands of
      matmuls and convolutions only).
    """
    if precision == "no":
        return None
    if precision != "bf16":
        raise ConfigError("train.mixed_precision", f"{precision} under FSDP: use bf16 or fp32")
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(
        param_dtype=torch.bfloat16,
        reduce_dtype=torch.float32,
        buffer_dtype=torch.float32,
        cast_root_forward_inputs=False,
    )


def prepare_plugin(plugin: Any, ignored: Sequence[torch.nn.Module], precision: str = "no") -> None:
    """Check accelerate's FSDP plugin before wrapping, set its mixed precision to
    :func:`mixed_precision_policy` of accelerate's ``precision`` (replacing the policy accelerate derives
    from ``mixed_precision: bf16``, which reduces gradients in bf16), and leave ``ignored`` modules unsharded
    (modules the adapter calls outside the denoiser's forward, such as the toy model's text encoder). They
    replace a list left by an earlier run in the same process (``solace ablate``); a regex given by the user
    is kept."""
    if plugin is None:
        raise ConfigError("accelerate config", "distributed_type FSDP without an fsdp_config; see "
                          "configs/accelerate/fsdp_sd3.yaml")  # fmt: skip
    if getattr(plugin, "fsdp_version", 1) != 1:
        raise ConfigError(
            "accelerate config fsdp_config.fsdp_version",
            f"is {plugin.fsdp_version}; solace's trainer drives FSDP version 1: set fsdp_version: 1 "
            "(configs/accelerate/fsdp_sd3.yaml)",
        )
    if not plugin.use_orig_params:
        raise ConfigError(
            "accelerate config fsdp_config.fsdp_use_orig_params",
            "is false; set it to true (the trainer keeps the LoRA parameters, frozen base weights share "
            "their FSDP units)",
        )
    plugin.mixed_precision_policy = mixed_precision_policy(precision)
    if not isinstance(plugin.ignored_modules, str):
        plugin.ignored_modules = list(ignored) or None


def check_uniform_dtype(denoiser: torch.nn.Module, ignored: Sequence[torch.nn.Module]) -> None:
    """FSDP version 1 flattens each unit's parameters into one tensor of one dtype, so a base cast to bf16 /
    fp16 (``model.dtype``) beside float32 LoRA weights in the same block cannot be wrapped: refuse it before
    wrapping, with the fix (a float32 base computed in bf16 by FSDP's mixed precision, see the module
    docstring), rather than let torch fail inside ``accelerator.prepare``."""
    skip = {id(p) for m in ignored for p in m.parameters()}
    dtypes = {p.dtype for p in denoiser.parameters() if id(p) not in skip}
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ConfigError(
            "model.dtype",
            f"the denoiser holds {names} parameters (the base cast to model.dtype, the LoRA in float32), "
            "which FSDP version 1 cannot put in one unit; under FSDP set model.dtype=fp32 with "
            "train.mixed_precision=bf16 (the float32 shards are cast to bf16 for every forward: a bf16 "
            "base's arithmetic), or launch with DDP (--multi_gpu)",
        )


def check_lora_units(wrapped: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
    """Refuse a wrapping that leaves LoRA parameters in the root FSDP unit (see the module docstring)."""
    handle = getattr(wrapped, "_handle", None)
    in_root = {id(p) for p in getattr(getattr(handle, "flat_param", None), "_params", None) or []}
    n = sum(id(p) in in_root for p in params)
    if n:
        raise ConfigError(
            WRAP_FIELD,
            f"{n} LoRA parameters are left in the root FSDP unit, whose gathered weights FSDP keeps between "
            "forwards; name the block classes that hold the LoRA layers (e.g. JointTransformerBlock for "
            "SD3, FluxTransformerBlock,FluxSingleTransformerBlock for FLUX)",
        )


class ShardedParams:
    """The trained parameters of an FSDP-wrapped denoiser; every method is a collective."""

    def __init__(self, wrapped: torch.nn.Module, params: Sequence[torch.nn.Parameter]):
        self.wrapped = wrapped
        self.params = list(params)

    @contextlib.contextmanager
    def summoned(self, writeback: bool = False) -> Iterator[None]:
        """Whole parameters (their usual shapes) inside; with ``writeback`` changes return to the shards."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.wrapped, writeback=writeback):
            yield

    @contextlib.contextmanager
    def _restored(self) -> Iterator[None]:
        """The parameters' pieces as they were before the block (:meth:`full` and :meth:`local` borrow
        them to carry other tensors through FSDP's gather)."""
        kept = [p.detach().clone() for p in self.params]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept, strict=True):
                    p.copy_(k)

    @torch.no_grad()
    def full(self, pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Whole tensors from per-parameter pieces shaped like the parameters' shards."""
        with self._restored():
            for p, x in zip(self.params, pieces, strict=True):
                p.copy_(x)
            with self.summoned():
                return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def local(self, whole: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This process's pieces of whole tensors shaped like the parameters (inverse of :meth:`full`)."""
        with self._restored():
            with self.summoned(writeback=True):
                for i, (p, x) in enumerate(zip(self.params, whole, strict=True)):
                    if tuple(x.shape) != tuple(p.shape):
                        raise ConfigError("resume", f"tensor {i} has shape {tuple(x.shape)}, the LoRA "
                                          f"parameter {tuple(p.shape)}: saved for another LoRA?")  # fmt: skip
                    p.copy_(x)
            return [p.detach().clone() for p in self.params]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm over every process's gradient shards; returns that norm."""
        return self.wrapped.clip_grad_norm_(max_norm)


def _index_of(opt_state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(i): s for i, s in opt_state["state"].items()}


def full_optimizer_state(opt: torch.optim.Optimizer, sp: ShardedParams) -> dict[str, Any]:
    """``opt.state_dict()`` with whole moment tensors (the format of an unsharded run, so a checkpoint resumes
    under any backend). A parameter whose piece is empty here has no state here: its step count comes from
    the other processes (a max over them), its moments from their pieces."""
    import torch.distributed as dist

    sd = opt.state_dict()
    state = _index_of(sd)
    n = len(sp.params)
    steps = torch.tensor([float(state.get(i, {}).get("step", 0.0)) for i in range(n)])
    names: list[set[str]] = [set() for _ in range(dist.get_world_size())]
    mine = {k for s in state.values() for k, v in s.items() if torch.is_tensor(v) and v.ndim > 0}
    dist.all_gather_object(names, mine)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    out: dict[int, dict[str, Any]] = {i: {"step": torch.tensor(float(s))} for i, s in enumerate(steps) if s}
    for key in sorted(set().union(*names)):
        pieces = [state.get(i, {}).get(key, torch.zeros_like(p)) for i, p in enumerate(sp.params)]
        for i, t in enumerate(sp.full(pieces)):
            if i in out:
                out[i][key] = t
    return {"state": out, "param_groups": sd["param_groups"]}


def local_optimizer_state(full_state: dict[str, Any], sp: ShardedParams) -> dict[str, Any]:
    """This process's pieces of an optimizer state dict with whole tensors (inverse of
    :func:`full_optimizer_state`); the same on every process, since all read the same checkpoint."""
    state = _index_of(full_state)
    keys = sorted({k for s in state.values() for k, v in s.items() if torch.is_tensor(v) and v.ndim > 0})
    out = {i: {k: v for k, v in s.items() if k not in keys} for i, s in state.items()}
    with sp.summoned():
        shapes = [tuple(p.shape) for p in sp.params]
    for key in keys:
        whole = [
            state.get(i, {}).get(key, torch.zeros(shapes[i], dtype=p.dtype, device=p.device))
            for i, p in enumerate(sp.params)
        ]
        for i, t in enumerate(sp.local(whole)):
            if i in out:
                out[i][key] = t
    return {"state": out, "param_groups": full_state["param_groups"]}
