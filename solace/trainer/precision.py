"""Numeric precision of a training run: bf16 autocast (``train.mixed_precision``) and TF32 (``train.tf32``).

``train.mixed_precision: bf16`` runs the denoiser's forwards under bf16 autocast through accelerate (the
Accelerator's ``mixed_precision``; ``prepare`` wraps the denoiser's ``forward`` in ``torch.autocast`` and
returns float32 outputs): every forward of the denoiser, so the sampler's stored log-probs and the update's
recomputed ones come from the same arithmetic (the first update's PPO ratio is 1 up to rounding). The
weights keep their dtype: the LoRA and AdamW's state stay float32, the base stays ``model.dtype``; the
velocities, latents and log-probs are float32 (:func:`solace.sampling.sampler.cfg_velocity`). Under FSDP
the same autocast runs with FSDP's own mixed precision: the float32 shards are cast to bf16 for each
forward and backward, the gradients reduced in float32 (:func:`solace.trainer.fsdp.mixed_precision_policy`).
``fp32`` (the default) is accelerate's ``no``: no autocast. (The values are spelled as ``model.dtype``'s, not
as accelerate's ``no``, which YAML reads as false.)

fp16 is refused: its gradients underflow without a loss scaler (``GradScaler``), whose skipped steps the
trainer does not drive. It is refused where the config asks for it (``train.mixed_precision``, when the
config loads) and where accelerate's launcher or config does (``ACCELERATE_MIXED_PRECISION``, the
Accelerator's ``mixed_precision``), in one line naming the field and the fix (:func:`check_accelerate`).

TF32 (:func:`set_tf32`): float32 matmuls and convolutions on CUDA use TensorFloat-32 (10-bit mantissa
products, float32 accumulation), on by default; CPU arithmetic never changes.
"""

from __future__ import annotations

from typing import Any

from solace.errors import ConfigError

FIELD = "train.mixed_precision"
ACCELERATE_FIELD = "accelerate config mixed_precision"
LAUNCHER = "accelerate launch (ACCELERATE_MIXED_PRECISION)"
FP16_WHY = "fp16 needs a loss scaler (GradScaler) against gradient underflow, which solace does not drive"
#: ``train.mixed_precision`` -> accelerate's ``mixed_precision``
ACCELERATE_NAME = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def check_config(mixed_precision: str) -> None:
    """``train.mixed_precision`` is ``fp32`` or ``bf16`` (fp16 refused with the fix)."""
    if mixed_precision == "fp16":
        raise ConfigError(FIELD, f"{FP16_WHY}; use bf16 (the same memory, no scaler) or fp32")


def check_accelerate(mixed_precision: str, accelerate: str | None, where: str) -> None:
    """The precision accelerate was set to (``where``: its launcher, see :func:`launcher_precision`, or the
    Accelerator the trainer runs with) agrees with ``train.mixed_precision``; None (not set) agrees with
    anything. fp16 is refused, and so is a precision other than the config's: the run's config records its
    precision, so it must say it."""
    wanted = ACCELERATE_NAME[mixed_precision]
    if accelerate is None or accelerate == wanted:
        return
    if accelerate == "fp16":
        raise ConfigError(
            ACCELERATE_FIELD,
            f"{where} says fp16: {FP16_WHY}; launch with --mixed_precision no (accelerate config "
            "mixed_precision: 'no') and set train.mixed_precision=bf16 for bf16 autocast",
        )
    ours = {v: k for k, v in ACCELERATE_NAME.items()}.get(accelerate)
    fix = f"set train.mixed_precision={ours} or " if ours else ""
    raise ConfigError(
        ACCELERATE_FIELD,
        f"{where} says {accelerate} but train.mixed_precision is {mixed_precision}, and the run's config "
        f"sets the precision: {fix}launch with --mixed_precision {wanted}",
    )


def launcher_precision(environ: Any) -> str | None:
    """The precision ``accelerate launch`` (or its config file) asked for, None where it asked for nothing:
    its variable unset, or ``no``, the launcher's default (a bf16 config then needs no launcher flag)."""
    value = environ.get("ACCELERATE_MIXED_PRECISION")
    value = value.strip().lower() if value else None
    return None if value in (None, "", "no") else value


def set_tf32(enabled: bool, device_type: str) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on a CUDA ``device_type``; nothing elsewhere. Through
    torch's ``allow_tf32`` flags, the ones accelerate sets (torch refuses a mix of these and its newer
    ``fp32_precision`` settings)."""
    import torch

    if device_type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
