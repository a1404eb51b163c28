"""Exact parameter counts of the real architectures (built on the meta device: no memory, no download), for
BENCHMARKS' memory table: SD3.5-Medium's MMDiT, FLUX.1-dev's transformer, SD3.5's text encoders and the
LoRA r = 32 each trainer attaches.

    python bench/param_counts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_memory import FLUX_DEV  # noqa: E402
from gpu_text import CLIP_G, CLIP_L, T5_XXL, _clip, _t5  # noqa: E402
from sd3_pipeline import SD35_MEDIUM  # noqa: E402

from solace.models.flux import FLUX_LORA_TARGETS  # noqa: E402
from solace.models.sd3 import SD3_LORA_TARGETS  # noqa: E402


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    with torch.device("meta"):
        models = {
            "SD3.5-M MMDiT": (SD3Transformer2DModel(**SD35_MEDIUM), SD3_LORA_TARGETS),
            "FLUX.1-dev transformer": (FluxTransformer2DModel(**FLUX_DEV), FLUX_LORA_TARGETS),
            "CLIP-L text": (_clip(CLIP_L, 49408), None),
            "OpenCLIP bigG text": (_clip(CLIP_G, 49408), None),
            "T5-XXL encoder": (_t5(T5_XXL), None),
        }
    for name, (m, targets) in models.items():
        n = count(m)
        line = f"{name}: {n / 1e9:.3f} B parameters, {n * 2 / 2**30:.2f} GiB in bf16"
        if targets:
            with torch.device("meta"):
                inject_adapter_in_model(LoraConfig(r=32, lora_alpha=64, target_modules=targets), m)
            lora = count(m) - n
            line += f"; LoRA r=32: {lora / 1e6:.1f} M ({lora * 16 / 2**30:.2f} GiB with fp32 grads + AdamW)"
        print(line)


if __name__ == "__main__":
    main()
