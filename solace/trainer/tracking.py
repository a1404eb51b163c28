"""Experiment trackers through accelerate's tracker API (``train.log_with``: tensorboard, wandb or both).

The trainer builds its ``Accelerator(log_with=...)`` from :func:`log_with`, starts the trackers with
``init_trackers`` on its first log (:class:`Trackers`), logs scalars with ``Accelerator.log`` and image grids
with each tracker's ``log_images``, and finishes them at the end of the run. TensorBoard keeps writing to
``<output_dir>/tb`` (its run name is ``tb``); wandb logs to the project ``train.tracker_project``, the run
named after the output folder, its files under ``$WANDB_DIR`` or else the output folder.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from solace.errors import ConfigError

TB_RUN = "tb"
"""TensorBoard's run name: its events go to ``<output_dir>/tb``."""


def check_installed(names: list[str]) -> None:
    """Every requested tracker's package imports (accelerate would drop a missing one silently)."""
    fixes = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'solace[wandb]' (or wandb)"}
    for name in names:
        if importlib.util.find_spec(name) is None:
            fix = fixes[name]
            raise ConfigError(
                "train.log_with", f"{name} is asked for but not installed: {fix}, or remove it from the list"
            )


def log_with(names: list[str], out: Path) -> list[Any] | None:
    """``Accelerator(log_with=...)`` for ``train.log_with``: accelerate's TensorBoard tracker bound to
    ``out / "tb"`` (the path earlier runs wrote), and wandb by name (accelerate builds it in
    ``init_trackers``); None for no tracker."""
    from accelerate.tracking import TensorBoardTracker

    check_installed(names)
    return [TensorBoardTracker(TB_RUN, str(out)) if n == "tensorboard" else n for n in names] or None


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys with the scalar values trackers accept (TensorBoard's hparams take
    bool, int, float and str only): lists, dicts left empty and None become their text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_config(v, key + "."))
        elif isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


WANDB_ID_FILE = "wandb_run_id.txt"
"""The output folder's wandb run id: a resumed run (``--resume``) logs on into the same wandb run."""


def wandb_run_id(out: Path) -> str:
    """The wandb run id of the output folder: read from :data:`WANDB_ID_FILE`, or made and written there
    on the first start (8 random lowercase letters and digits, wandb's own form)."""
    import secrets
    import string

    path = out / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    out.mkdir(parents=True, exist_ok=True)
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id


def init_kwargs(out: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per-tracker keywords of ``init_trackers``: wandb's run is named after the output folder, keeps its
    files there unless ``WANDB_DIR`` says otherwise, and has the folder's run id (:func:`wandb_run_id`,
    ``resume="allow"``), so ``--resume`` continues the same wandb run; steps already logged past the
    checkpoint are not logged again by wandb (it keeps a run's steps increasing)."""
    if names is not None and "wandb" not in names:
        return {}
    wandb: dict[str, Any] = {"name": out.name, "id": wandb_run_id(out), "resume": "allow"}
    if not os.environ.get("WANDB_DIR"):
        out.mkdir(parents=True, exist_ok=True)
        wandb["dir"] = str(out)
    return {"wandb": wandb}


def finite_scalars(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` as floats (None, NaN and inf are not logged)."""
    out = {}
    for k, v in values.items():
        if v is not None and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Trackers:
    """The run's trackers: started on first use (main process), then scalars, image grids, and finish."""

    def __init__(self, accelerator: Any, project: str, out: Path, config: dict[str, Any]):
        self.acc, self.project, self.out, self.config = accelerator, project, out, config
        self.started = self.closed = False

    def start(self) -> None:
        if self.started or self.closed or not self.acc.is_main_process:
            return
        self.started = True
        names = [str(getattr(t, "value", None) or getattr(t, "name", t)) for t in self.acc.log_with]
        config, kwargs = flat_config(self.config), init_kwargs(self.out, names)
        self.acc.init_trackers(self.project, config=config, init_kwargs=kwargs)

    def log(self, values: dict[str, Any], step: int) -> None:
        if not self.acc.is_main_process:
            return
        self.start()
        scalars = finite_scalars(values)
        if scalars and self.acc.trackers:
            self.acc.log(scalars, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        """Log an image file (a grid) to every tracker that takes images."""
        if not self.acc.is_main_process or not Path(path).is_file():
            return
        import numpy as np
        from PIL import Image

        self.start()
        arr = np.asarray(Image.open(path).convert("RGB"))
        for t in self.acc.trackers:
            if t.name == "tensorboard":
                t.log_images({name: arr[None]}, step=step, dataformats="NHWC")
            elif t.name == "wandb":
                t.log_images({name: [arr]}, step=step)

    def finish(self) -> None:
        """Close every tracker (all events on disk) and forget them; the process group stays up (several
        runs train in one process, ``solace ablate``)."""
        if not self.started:
            return
        for t in self.acc.trackers:
            t.finish()
        self.acc.trackers = []
        self.closed = True
