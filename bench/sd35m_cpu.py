"""One ``solace train`` iteration of the real SD3.5-Medium size on a CPU: wall time and peak RSS.

Proves that nothing in the trainer is tied to tiny shapes: the 2.243 B-parameter MMDiT of SD3.5-Medium's
config (24 blocks, dual attention in blocks 0-12, RMS qk-norm, the 384 x 384 position-embedding table cropped
to the image), random weights, in bf16 (``model.dtype=bf16``, the ``sd35m`` preset's), with the preset's LoRA
(r = 32 on every block's attention projections, both attentions of the dual blocks) and gradient
checkpointing.
Text: CLIP-L and CLIP-G of their real sizes (``--clip-layers N`` makes them shallower, same hidden sizes); T5
off (``model.text_encoder_3=false``: its 256 tokens are zeros, so the transformer still sees 77 + 256 text
tokens). Images of 64 x 64 px (16 image tokens), one prompt, G = 2, T = 2 steps, K = 2 probes.

1. ``bench/sd3_pipeline.py`` builds the pipeline folder once (reused when it exists), in a process of its own;
2. ``/usr/bin/time -v python -m solace train --config sd35m OVERRIDES`` runs one iteration through the CLI;
3. the figures are gathered into one JSON: wall time and maximum RSS (``time -v``), the trainer's stage
   timers and update statistics (``log.csv``), the LoRA's layers (the exported ``lora/``), and the weights'
   and LoRA's bytes beside BENCHMARKS' memory table row for ``model.text_encoder_3=false``.

    python bench/sd35m_cpu.py --json bench/results/sd35m_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMPT = "a photo of a red apple on a wooden table, studio light"
README_ROW = (
    "SD3.5-M, `model.text_encoder_3=false` (no T5): 4.18 + 1.52 + 0.16 + 0.36 = 6.2 GiB before activations"
)


def overrides(pipeline: Path, out: Path, prompts: Path, threads: int) -> list[str]:
    return [
        f"model.name={pipeline}",
        "model.text_encoder_3=false",
        "model.resolution=64",
        f"data.train_prompts={prompts}",
        f"eval.prompts={prompts}",
        "eval.metrics=[]",
        "sampling.prompts_per_step=1",
        "sampling.group_size=2",
        "sampling.num_steps=2",
        "reward.self_confidence.num_probes=2",
        "train.iterations=1",
        "train.device=cpu",
        f"train.threads={threads}",
        "train.report=false",
        "eval.image_every=0",
        "eval.every=0",
        "train.log_with=[]",
        f"train.output_dir={out}",
    ]


def time_v(stderr: str) -> dict[str, float]:
    """Wall seconds and maximum RSS (GiB) from GNU time's ``-v`` report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if not (wall and rss):
        return {}
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {"wall_seconds": seconds, "max_rss_gib": int(rss.group(1)) / 2**20}


def lora_layers(folder: Path) -> dict[str, Any]:
    """Which transformer blocks and projections the exported LoRA covers, and its parameter count."""
    from safetensors import safe_open

    files = list(folder.glob("*.safetensors"))
    if not files:
        return {}
    blocks: dict[str, set[int]] = {"attn": set(), "attn2": set()}
    params = 0
    with safe_open(str(files[0]), "pt") as f:
        for k in f.keys():
            params += f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1]
            m = re.search(r"transformer_blocks\.(\d+)\.(attn2?)\.", k)
            if m:
                blocks[m.group(2)].add(int(m.group(1)))
    return {"tensors_file": files[0].name, "params": params, **{k: sorted(v) for k, v in blocks.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="runs/bench_pipelines/sd35m_cpu")
    p.add_argument("--out", default="runs/sd35m_cpu")
    p.add_argument("--clip-layers", type=int, default=0, help="CLIP depth (0: the real 12 / 32 layers)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs="*", help="more key=value overrides for `solace train`")
    a = p.parse_args(argv)
    pipeline, out = Path(a.pipeline), Path(a.out)
    res: dict[str, Any] = {"readme_estimate": README_ROW}
    t0 = time.perf_counter()
    build = [
        sys.executable,
        str(HERE / "sd3_pipeline.py"),
        str(pipeline),
        "--size",
        "sd35m",
        "--dtype",
        "bf16",
    ]
    build += ["--device", "cpu", "--no-t5", "--clip-layers", str(a.clip_layers)]
    subprocess.run(build, check=True)
    res["build_seconds"] = time.perf_counter() - t0
    res["pipeline"] = json.loads((pipeline / "bench_pipeline.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    prompts = out.parent / f"{out.name}_prompts.txt"
    prompts.write_text(PROMPT + "\n")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "solace", "train", "--config", "sd35m"]
    cmd += overrides(pipeline, out, prompts, a.threads) + list(a.extra)
    res["command"] = " ".join(cmd)
    print(res["command"], flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    res["returncode"] = r.returncode
    res |= time_v(r.stderr)
    (out.parent / f"{out.name}.stderr.log").write_text(r.stderr)
    try:
        with open(out / "log.csv", newline="") as f:
            row = next(csv.DictReader(f))
        keys = ("time/sampling", "time/reward", "time/update", "reward/mean", "train/loss", "train/kl")
        res["log"] = {k: float(row[k]) for k in (*keys, "train/grad_norm") if row.get(k) not in (None, "")}
    except (OSError, StopIteration):
        res["log"] = {}
    res["lora"] = lora_layers(out / "lora")
    counts = res["pipeline"]["parameters"]
    text = counts.get("text_encoder", 0) + counts.get("text_encoder_2", 0)
    res["resident_gib"] = {  # bf16 weights (2 bytes) and the fp32 LoRA with its gradient and AdamW state (16)
        "transformer": counts["transformer"] * 2 / 2**30,
        "text_encoders": text * 2 / 2**30,
        "vae": counts["vae"] * 2 / 2**30,
        "lora_adamw": res["lora"].get("params", 0) * 16 / 2**30,
    }
    res["resident_gib"]["total"] = sum(res["resident_gib"].values())
    print(json.dumps({k: v for k, v in res.items() if k != "command"}, indent=1))
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return r.returncode


if __name__ == "__main__":
    raise SystemExit(main())
