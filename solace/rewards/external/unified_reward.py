"""UnifiedReward (Wang et al., 2025) through an OpenAI-compatible VLM server -- optional, never run offline.

Serve the judge yourself (e.g. ``CodeGoat24/UnifiedReward-7b-v1.5`` with sglang or vLLM, which expose
``/v1/chat/completions``) and give its base URL as ``url`` (e.g. ``http://127.0.0.1:17140/v1``). Each image
is sent as a PNG data URL (resized to 512x512) with Flow-GRPO's pointwise prompt
(``unifiedreward_score_sglang`` in ``flow_grpo/rewards.py``) at temperature 0; the reply's
``Final Score: x`` (1-5) is parsed:

    score = x / divisor        (divisor=5, Flow-GRPO's reward in [0.2, 1]; divisor=1 for the raw 1-5 metric)

A reply without a score counts 0. Requests run in a thread pool of ``batch_size`` using only the standard
library (no ``openai`` package needed). Nothing here touches the network until the reward is called.
"""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from solace.errors import ConfigError
from solace.rewards.external._common import check_batch_size, check_inputs, first_line, to_uint8_hwc
from solace.rewards.registry import RewardFn, register_reward

DEFAULT_MODEL = "UnifiedReward-7b-v1.5"
_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")
QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to "
    "evaluate this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this "
    "image aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, "
    "and attributes as described in the caption.\n2. Overall Image Quality: Examine the visual quality of "
    "this image, including clarity, detail preservation, color accuracy, and overall aesthetic appeal.\n"
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]"
)


def parse_score(text: str) -> float:
    """The number after ``Final Score:`` (1-5), or 0.0 when absent (Flow-GRPO's convention)."""
    m = _SCORE.search(text or "")
    return float(m.group(1)) if m else 0.0


def build_request(image_hwc_uint8, prompt: str, model: str, image_size: int | None = 512) -> dict:
    """The chat-completions payload for one image and prompt."""
    from PIL import Image

    img = Image.fromarray(image_hwc_uint8)
    if image_size:
        img = img.resize((image_size, image_size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image;base64," + base64.b64encode(buf.getvalue()).decode("utf-8")
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": QUESTION.format(prompt=prompt)},
                ],
            }
        ],
        "temperature": 0,
    }


@register_reward("unified_reward")
def unified_reward(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 8,
    url: str | None = None,
    api_key: str = "EMPTY",
    divisor: float = 5.0,
    timeout: float = 120.0,
    image_size: int | None = 512,
) -> RewardFn:
    """UnifiedReward via a VLM server at ``url`` (required). ``model``: the served model name; ``device``
    and ``dtype`` are accepted for the common interface (the server decides); ``batch_size``: parallel
    requests."""
    check_batch_size(batch_size, "reward.unified_reward.batch_size")
    if not url:
        raise ConfigError(
            "reward.unified_reward.url",
            "set the base URL of an OpenAI-compatible server running UnifiedReward (e.g. http://127.0.0.1:17140/v1)",
        )
    if not isinstance(divisor, (int, float)) or divisor <= 0:
        raise ConfigError("reward.unified_reward.divisor", f"must be a positive number, got {divisor!r}")
    endpoint = url.rstrip("/") + "/chat/completions"

    def ask(payload: dict) -> str:
        req = urllib.request.Request(
            endpoint,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = json.loads(resp.read().decode("utf-8"))
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            msg = f"request to {endpoint} failed: {first_line(e)}"
            raise ConfigError("reward.unified_reward.url", msg) from None
        try:
            return body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ""

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, prompts = check_inputs(images, prompts, metadata, "reward.unified_reward")
        arrays = to_uint8_hwc(images)
        payloads = [build_request(a, p, model, image_size) for a, p in zip(arrays, prompts, strict=True)]
        with ThreadPoolExecutor(max_workers=batch_size) as pool:
            replies = list(pool.map(ask, payloads))
        scores = [parse_score(r) / divisor for r in replies]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    return fn
