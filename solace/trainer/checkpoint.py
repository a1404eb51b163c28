"""Atomic checkpoints (safetensors + JSON, never pickle) and resume.

A checkpoint is a folder ``checkpoints/iter_000010`` holding ``lora.safetensors`` (the trainable LoRA with
its PEFT config as metadata), ``optimizer.safetensors`` (AdamW moments, by parameter index), and
``state.json`` (iteration, optimizer step counts and hyper-parameters, metric history). It is written
to a temporary folder and renamed into place, then ``checkpoints/latest`` is replaced atomically, so a run
killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from solace.errors import ConfigError


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        scalars["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars["state"][str(idx)][k] = float(v) if torch.is_tensor(v) else v
    return tensors, scalars


def _load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for idx, st in scalars["state"].items():
        state[int(idx)] = {k: torch.tensor(v) if k == "step" else v for k, v in st.items()}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def save_checkpoint(
    folder: Path,
    iteration: int,
    lora: dict[str, torch.Tensor],
    lora_meta: dict[str, str],
    opt: torch.optim.Optimizer,
    extra: dict[str, Any],
) -> Path:
    """Write checkpoint ``iter_{iteration:06d}`` under ``folder`` atomically; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"iter_{iteration:06d}"
    tmp = folder / f".tmp_iter_{iteration:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in lora.items()},
        str(tmp / "lora.safetensors"),
        metadata=lora_meta,
    )
    ot, os_ = _optimizer_tensors(opt)
    save_file(ot, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "optimizer": os_, **extra}))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = folder / f".latest_{os.getpid()}"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, folder / "latest")
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    ptr = folder / "latest"
    if not ptr.exists():
        return None
    p = folder / ptr.read_text().strip()
    return p if (p / "state.json").exists() else None


def load_checkpoint(path: Path, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the optimizer in place; return (lora state dict, state.json content)."""
    if not (path / "state.json").exists():
        raise ConfigError("resume", f"{path} is not a solace checkpoint (no state.json)")
    state = json.loads((path / "state.json").read_text())
    _load_optimizer(opt, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    return load_file(str(path / "lora.safetensors")), state
