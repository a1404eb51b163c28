"""Tiny toy-world training setups shared by the trainer tests and their subprocess scripts."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from solace.toy.adapter import save_toy_weights
from solace.toy.net import ToyFlowNet
from solace.toy.world import vocabulary


def make_tiny_toy_weights(path: str | Path, seed: int = 0) -> Path:
    """A tiny random toy net (channels 16) with its zero-initialised output layers perturbed, so that LoRA
    on the attention projections receives gradients (a zero output layer would block them)."""
    torch.manual_seed(seed)
    net = ToyFlowNet(len(vocabulary()), (16, 16, 16))
    with torch.no_grad():
        for p in net.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    save_toy_weights(net, path)
    return Path(path)


# A script that runs a bench script (argv[1:]) after replacing the Flow-GRPO update's loss by ten times
# itself: a bench figure that follows the library's loss scales with it (test_bench_scripts,
# test_gpu_check_flags)
TENFOLD_LOSS = """
import runpy, sys
import solace.trainer.updates as updates
_loss = updates.FlowGRPOUpdate.loss
def loss(self, batch, term):
    value, parts = _loss(self, batch, term)
    return 10.0 * value, parts
updates.FlowGRPOUpdate.loss = loss
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# The small run both the toy and the tiny-diffusers trainer tests use (2 iterations of 2 groups of 4).
TINY_RUN = {
    "model.lora.rank": 4,
    "model.lora.alpha": 8,
    "sampling.group_size": 4,
    "sampling.prompts_per_step": 2,
    "sampling.num_steps": 4,
    "reward.self_confidence.num_probes": 2,
    "train.micro_batch_size": 4,
    "grpo.clip_range": 0.2,
    "optim.lr": 0.01,
    "train.iterations": 2,
    "eval.every": 0,
    "eval.image_every": 0,
    "train.checkpoint_every": 1,
    "train.threads": 1,
    "train.device": "cpu",
}

# The tiny run with the NFT update instead: ODE sampling, and an EMA old policy (decay 0.5) that is part of
# the run's state, so resume tests cover it.
TINY_NFT = {
    "train.algorithm": "nft",
    "sampling.noise_level": 0,
    "nft.ema_decay": 0.5,
    "train.micro_batch_size": 4,
}


def tiny_overrides(weights: str | Path, out: str | Path, **extra: object) -> list[str]:
    base = {
        "model.name": str(weights),
        **TINY_RUN,
        "eval.num_steps": 4,
        "sampling.batch_size": 8,
        "train.output_dir": str(out),
        "train.report": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_bad_inputs(d: Path, weights: str | Path) -> Path:
    """Files a careless user passes, under ``d``: garbage safetensors, a LoRA of another model (the tiny
    net's), prompt files that are not UTF-8, have a number as prompt, bad GenEval metadata, a bad JSON line
    or no prompt at all, a file and a folder in the wrong places."""
    from solace.models.lora import add_lora, save_lora
    from solace.toy.adapter import ToyAdapter

    d = Path(d)
    (d / "garbage.safetensors").write_bytes(b"\x00" * 7 + b"not a tensor file" * 10)
    tiny = ToyAdapter(weights=weights)
    add_lora(tiny.denoiser, 4, 8, ToyAdapter.lora_target_modules)
    save_lora(tiny, d / "other_lora")
    (d / "latin1.txt").write_bytes("a photo of a caf\xe9\n".encode("latin-1"))
    (d / "include.jsonl").write_text(
        '{"prompt": "a photo of a circle", "tag": "single_object", "include": "oops"}\n'
    )
    (d / "number.jsonl").write_text('{"prompt": 42}\n')
    (d / "bad.jsonl").write_text('{"prompt": "a"}\n{not json\n')
    (d / "empty.txt").write_text("\n \n")
    (d / "prompts.json").write_text('[{"prompt": "a photo of a circle"}]\n')
    (d / "json_in.txt").write_text('{"prompt": "a photo of a circle", "tag": "single_object"}\n')
    rec = '{"prompt": "a photo of %s", "tag": "single_object", "include": [{"class": "%s", "count": %d}]}\n'
    (d / "dog.jsonl").write_text(rec % ("a dog", "dog", 1))
    (d / "negative_count.jsonl").write_text(rec % ("minus three circles", "circle", -3))
    (d / "no_count.jsonl").write_text('{"prompt": "a photo of a circle", "include": [{"class": "circle"}]}\n')
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "loop.yaml").write_text(
        "defaults: [../sub/loop.yaml]\n"
    )  # includes itself, another spelling
    (d / "a_file").write_text("x")
    (d / "folder").mkdir(exist_ok=True)
    return d


def bf16_attention() -> contextlib.AbstractContextManager:
    """Where torch's CPU flash attention runs in bf16, nothing; where it refuses (``pack_vnni2 is only
    supported when avx512 is supported``: ``ATEN_CPU_CAPABILITY=default`` on a CPU with AVX-512 BF16, where
    the kernel picks its packing from the hardware but the simulated kernel set forbids it), the math
    attention backend instead, so the bf16 tests still run there."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 64, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 80, 16, dtype=torch.bfloat16)
    try:
        F.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(1, 1, 1, 80, dtype=torch.bool))
    except RuntimeError as e:
        if "pack_vnni2" not in str(e):
            raise
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
