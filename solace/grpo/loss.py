"""The GRPO objective on Flow-GRPO's SDE steps: PPO-clipped surrogate plus beta * KL to the reference."""

from __future__ import annotations

import torch

from solace.errors import check

KL_FORMS = ("flow_grpo", "exact")


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped policy loss (Flow-GRPO Eq. 5; SOLACE Eq. 16), averaged over the batch.

    ``ratio = exp(log_prob - old_log_prob)``; ``loss = mean(max(-A * ratio, -A * clip(ratio, 1-e, 1+e)))``.
    On-policy the ratio is exactly 1 and the gradient is ``-A * grad log_prob`` per sample (over N).
    ``old_log_prob`` and ``advantages`` are constants of the objective and are detached here, so passing the
    current log-prob itself as ``old_log_prob`` (first on-policy epoch) still gives that gradient.

    Returns the loss and detached statistics: ``approx_kl`` (``0.5 * mean((log_prob - old)^2)``, as
    Flow-GRPO logs it), ``clipfrac`` (share of ratios outside the clip range), ``ratio_mean/min/max``.
    """
    check(clip_range > 0, "clip_range", f"must be > 0, got {clip_range}")
    check(
        log_prob.shape == old_log_prob.shape == advantages.shape,
        "advantages",
        f"shapes differ: log_prob {tuple(log_prob.shape)}, old {tuple(old_log_prob.shape)}, "
        f"advantages {tuple(advantages.shape)}",
    )
    old_log_prob, advantages = old_log_prob.detach(), advantages.detach()
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
        }
    return loss, stats


def gaussian_kl(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    dt: torch.Tensor | float | None = None,
    form: str = "flow_grpo",
) -> torch.Tensor:
    """KL between the policy's and the reference's Gaussian step distributions (SOLACE Eq. 17), per sample.

    Both steps share the same std, so ``KL = ||mean - ref_mean||^2 / (2 * std_step^2)``, averaged (not summed)
    over the latent's elements, like the log-prob.

    * ``form="flow_grpo"`` (default, as Flow-GRPO's released code): divides by ``2 * std_t^2`` with
      ``std_t = a sqrt(t / (1 - t))``, leaving out the step's ``|dt|``. This is the exact KL scaled by
      ``1 / |dt|``, i.e. beta is effectively larger on short steps.
    * ``form="exact"``: divides by ``2 * std_t^2 * |dt|``, the exact KL of the two step Gaussians; ``dt``
      (``t_next - t``) is required.

    ``std`` is broadcastable to ``mean`` (e.g. (B, 1, 1, 1)) or a scalar.
    """
    check(form in KL_FORMS, "kl_form", f"must be one of {KL_FORMS}, got {form!r}")
    sq = ((mean - ref_mean) ** 2).reshape(mean.shape[0], -1).mean(1)
    s2 = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).reshape(-1) ** 2
    if form == "exact":
        check(dt is not None, "dt", "the exact KL needs the step size dt = t_next - t")
        s2 = s2 * torch.as_tensor(dt, dtype=mean.dtype, device=mean.device).abs().reshape(-1)
    return sq / (2 * s2)
