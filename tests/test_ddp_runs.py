"""Two gloo processes (DDP) against one process: the tiny toy model, the tiny SD3 and FLUX pipelines, each
with Flow-GRPO (``grpo.beta=0`` and ``0.04``) and NFT (``nft.kl_beta=0``), an evaluation and an image grid
after every iteration and the report at the end (``tests/run_ddp_matrix.py``; one launch of each: 25 s and
36 s on 2 cores, 77 s together in a full suite run beside other jobs).

What broke before (issue 29): DDP broadcasts rank 0's buffers on the first forward after a synchronised
backward, and the main process's evaluations and grids ran through the DDP-wrapped module, alone. With
``grpo.beta=0`` (no KL reference forward, which all processes ran, after the last backward) SD3's
``pos_embed`` broadcast met the other process's next collective (gloo: "16384 vs 4"), or, with no evaluation
or grid before the end, hung against its checkpoint barrier. The SD3 runs here get a plain
``Accelerator(cpu=True)`` (DDP's default ``broadcast_buffers=True``), so they pass only because no forward
outside the policy update reaches DDP; the toy and FLUX runs use the trainer's own Accelerator.

Tolerances, one process against two: the samples, noise and probes do not depend on the number of processes,
and DDP's averaged gradient is the one process's gradient mathematically, so only rounding differs (the
forwards batch differently, gradients are summed in another order). Measured (2 cores, torch 2.13 CPU):
gathered log values (rewards, S_t, advantages, texture, the all-reduced gradient norm) within 1.5e-5
relative. The LoRA is compared by its relative L2 difference ||a - b|| / ||a|| over every tensor, not by
its largest entry: AdamW's first steps move a weight by about lr = 1e-2 whatever its gradient's size, so a
gradient near 0 whose sign the rounding flips moves one entry by up to 2 lr (measured 1.07e-3 in one entry
under ATEN_CPU_CAPABILITY=default), a change no other entry shares. Measured relative L2: at most 4.9e-6 with
the native kernels, 5.5e-5 under ATEN_CPU_CAPABILITY=default (toy Flow-GRPO beta 0). LORA_TOL = 1e-3 is 18x
that and far below the smallest effect of a fault (a process's samples missing from the gradient, a wrong
advantage slice, an extra or missing step change every entry by about lr against entries of a few lr:
relative 0.1 or more); LOG_RTOL = 1e-4 is 7x the logged values' worst. The per-process training
statistics (``train/loss``, ``train/kl``, ratios, NFT's terms) are the main process's own micro-batches and
are not compared.

Evaluations and grids (issue 29): each process samples its block of every evaluation's and grid's prompts x
samples, and all gather the per-sample scores or images (solace/evaluation/sharding.py); the test checks
each process's count of samples (both sampled, together what the one process sampled), the records against
one process's, and the grid before training (the same weights) within one 8-bit level. A sample computed in
a batch of another size rounds differently (6.6e-7 on the tiny FLUX images here), which flips a pixel's 8-bit
level where it lies on a rounding boundary: measured one flipped pixel, moving the tiny random CLIP's score
of that prompt by 5.8e-4 (1.5e-3 relative); one level in one pixel moves it by at most 6.8e-4 (measured on
every pixel of three random 32 px images). Toy records equal exactly; other evaluation values (SD3, image
statistics) within 2.3e-4 relative, the training's rounding. EVAL_TOL = 1e-3 relative and, for metric
scores, FLIP_TOL = 3e-3 absolute (four flipped levels) leave room for that; a sample from another noise or
prompt moves a tiny CLIP score by tenths, and a block left out of a gather is an error
(tests/test_eval_sharding.py).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from run_ddp_matrix import PLAN, TIMEOUT_MINUTES  # noqa: E402
from trainer_helpers import make_tiny_toy_weights  # noqa: E402

SCRIPT = HERE / "run_ddp_matrix.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LORA = Path("lora") / "pytorch_lora_weights.safetensors"
LORA_TOL = 1e-3  # relative L2 of the LoRA, 2 processes against 1
LOG_RTOL = 1e-4
EVAL_TOL = 1e-3
FLIP_TOL = 3e-3
GATHERED = ("reward/", "self_confidence/", "adv/", "monitor/", "train/grad_norm", "premise/")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_fsdp_training import _tiny_sd3_inputs
    from tiny_pipelines import make_tiny_flux, save_tiny_pipeline

    root = tmp_path_factory.mktemp("ddp")
    weights = make_tiny_toy_weights(root / "tiny_toy.safetensors")
    sd3, prompts, clip = _tiny_sd3_inputs(root)
    flux = save_tiny_pipeline(make_tiny_flux(seed=0), root / "flux")
    args = [str(weights), sd3, str(flux), prompts, clip]
    seconds = {}
    for n in (1, 2):
        launch = [sys.executable]
        if n == 2:  # --standalone: a free port, whatever else runs on the machine
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        t0 = time.perf_counter()
        subprocess.run([*launch, str(SCRIPT), str(root / f"p{n}"), *args], check=True, env=ENV, timeout=600,
                       cwd=root)  # fmt: skip
        seconds[n] = time.perf_counter() - t0
    print(f"one process {seconds[1]:.0f} s, two processes {seconds[2]:.0f} s")
    return root


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "log.csv") as fh:
        return list(csv.DictReader(fh))


def _numbers(x, path: str = ""):
    """Every number in a JSON document, by its path."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, int | float) and not isinstance(x, bool):
        yield path, float(x)


@pytest.mark.parametrize("model,update", PLAN)
def test_two_processes_finish_and_train_the_one_process_run(runs, model, update):
    one, two = runs / "p1" / f"{model}_{update}", runs / "p2" / f"{model}_{update}"
    ranks = [json.loads((two / f"ddp_rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world"] for d in ranks] == [2, 2]
    # the process group's timeout is the config's (torch's default is 30 minutes)
    assert all(d["timeout_s"] == TIMEOUT_MINUTES * 60 for d in ranks)
    # SD3's runs keep DDP's buffer broadcast (a plain Accelerator): the trainer's routing alone protects them
    assert all(d["broadcast_buffers"] == (model == "sd3") for d in ranks)
    for run in (one, two):  # evaluations and grids every iteration, the report at the end
        assert [e["iteration"] for e in json.loads((run / "evals.json").read_text())] == [0, 1, 2]
        assert sorted(p.name for p in (run / "images").iterdir()) == [f"iter_00000{i}.png" for i in range(3)]
        assert (run / "report.md").exists() and (run / "checkpoints" / "iter_000002").is_dir()

    a, b = load_file(str(one / LORA)), load_file(str(two / LORA))
    assert a.keys() == b.keys() and len(a) > 0
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 5e-3  # it trained
    diff = torch.cat([(a[k] - b[k]).flatten() for k in sorted(a)]).norm()
    rel = float(diff / torch.cat([a[k].flatten() for k in sorted(a)]).norm())
    assert rel <= LORA_TOL, rel

    r1, r2 = _rows(one), _rows(two)
    assert [r["iteration"] for r in r1] == [r["iteration"] for r in r2] == ["1", "2"]
    cols = [c for c in r1[0] if c.startswith(GATHERED) and r1[0][c] != ""]
    assert "reward/mean" in cols and "train/grad_norm" in cols
    for x, y in zip(r1, r2, strict=True):
        for c in cols:
            assert float(y[c]) == pytest.approx(float(x[c]), rel=LOG_RTOL, abs=1e-7, nan_ok=True), c
        if model == "toy":  # the premise was scored on both processes' slices (no AUC on a random net)
            assert {"premise/paper_groups", "premise/contrastive_auc"} <= set(cols)

    e1, e2 = (dict(_numbers(json.loads((r / "evals.json").read_text()))) for r in (one, two))
    assert e1.keys() == e2.keys()
    for k in e1:
        flips = FLIP_TOL if k.split(".")[1] in ("metrics", "base", "per_prompt") else 1e-6
        assert e2[k] == pytest.approx(e1[k], rel=EVAL_TOL, abs=flips), k


@pytest.mark.parametrize("model,update", PLAN)
def test_evaluations_and_grids_are_sampled_in_shares(runs, model, update):
    """Every evaluation and grid of the 2-process run was split: each process sampled a share, together
    exactly what the one process sampled (the grids' images and the records compared above and in
    ``test_two_processes_finish_and_train_the_one_process_run``)."""
    one, two = runs / "p1" / f"{model}_{update}", runs / "p2" / f"{model}_{update}"
    alone = json.loads((one / "ddp_rank0.json").read_text())["sampled"]
    shares = [json.loads((two / f"ddp_rank{r}.json").read_text())["sampled"] for r in (0, 1)]
    assert set(alone) == {"eval", "grid"}
    for what, n in alone.items():
        assert all(s[what] > 0 for s in shares) and sum(s[what] for s in shares) == n, (what, shares)
    # the grid before training (the same weights): gathered in order, each sample as one process samples
    # it but for the rounding of another batch size, at most one 8-bit level in a pixel
    a, b = (np.asarray(Image.open(r / "images" / "iter_000000.png"), dtype=np.int16) for r in (one, two))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()
