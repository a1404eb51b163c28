"""DiffusionNFT's forward-process objective (Zheng et al. 2025, arXiv 2509.16117), as pure functions.

Conventions of this project: ``x_t = (1 - t) x0 + t eps`` with t in [0, 1] (t = 1 is pure noise), the model
predicts the velocity ``v ~ eps - x0``, so its clean-image estimate is ``x0(v) = x_t - t v`` and
``x0(v) - x0 = -t (v - (eps - x0))``: the x0-regression error is the velocity error scaled by t.

DiffusionNFT trains on clean samples of the old (sampling) policy, re-noised on the forward process:

    r   = clip(A, -A_max, A_max) / (2 A_max) + 1/2                       optimality probability in [0, 1]
    v+  = beta v + (1 - beta) v_old,   v- = (1 + beta) v_old - beta v    implicit positive / negative policies
    L   = [ r ||x0(v+) - x0||^2 / w+  +  (1 - r) ||x0(v-) - x0||^2 / w- ] / beta

The paper writes the objective in velocity space (``r ||v+ - v_target||^2 + (1 - r) ||v- - v_target||^2``,
the negative-aware loss whose minimiser is ``v_old + (2/beta) * improvement direction``) and, as practical
choices, an optimality probability from clipped normalised rewards and an adaptive loss weighting. The
forms here follow the released code (``scripts/train_nft_sd3.py`` of NVlabs/DiffusionNFT): x0-space errors
(a squared x0 error is ``t^2`` times the squared velocity error), weights ``w+-`` that are the
stop-gradient mean absolute x0 error of the same branch, a ``1/beta`` factor and an overall ``A_max``
factor. The paper's equation numbers are not quoted: its text was not available when this was written,
only the released code and secondary summaries.

Gradient at ``v = v_old`` (e.g. the first step of an iteration when the old policy is an exact copy):
both branches predict ``x0(v)``, ``w+ = w- = w`` and, per sample,

    dL/dv = (2r - 1) / w * d/dv ||x0(v) - x0||^2           (the ``1/beta`` cancels the ``beta`` of v+-)

so DiffusionNFT starts as advantage-weighted flow matching: ``A_max (2r - 1) = clip(A)``, and with the
``A_max`` factor of the released code the on-policy gradient is ``clip(A) / w`` times the flow-matching one.
"""

from __future__ import annotations

import torch

from solace.errors import check

TIMESTEP_MODES = ("uniform", "grid")


def _per_sample(t: torch.Tensor | float, like: torch.Tensor, field: str = "t") -> torch.Tensor:
    """``t`` as a (B, 1, ..., 1) tensor broadcastable over ``like`` (a float or a (B,) tensor)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    check(
        t.ndim == 1 and t.shape[0] == like.shape[0],
        field,
        f"must be a float or a ({like.shape[0]},) tensor (one per sample), got shape {tuple(t.shape)}",
    )
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _mean_over_sample(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first (the per-sample "mean over pixels"), shape (B,)."""
    return x.reshape(x.shape[0], -1).mean(1)


def forward_noise(x0: torch.Tensor, t: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
    """The forward process ``x_t = (1 - t) x0 + t eps``; ``t`` is a float or (B,), one per sample."""
    check(eps.shape == x0.shape, "eps", f"shape {tuple(eps.shape)} must match x0 {tuple(x0.shape)}")
    tt = _per_sample(t, x0)
    return (1 - tt) * x0 + tt * eps


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """Clean-image estimate of a velocity, ``x0(v) = x_t - t v`` (exact when ``v = eps - x0``)."""
    return x_t - _per_sample(t, x_t) * v


def optimality(adv: torch.Tensor, adv_max: float = 5.0) -> torch.Tensor:
    """Optimality probability ``r = clip(A, -A_max, A_max) / (2 A_max) + 1/2``, in [0, 1].

    ``A = A_max`` (or more) gives r = 1 (fully positive), ``A = 0`` gives 1/2 (no signal), ``A <= -A_max``
    gives 0 (fully negative). The released code uses ``A_max = adv_clip_max = 5`` on group-normalised
    rewards, which is the paper's clipped, normalised reward mapped to [0, 1].
    """
    check(adv_max > 0, "adv_max", f"must be > 0, got {adv_max}")
    return adv.clamp(-adv_max, adv_max) / (2 * adv_max) + 0.5


def implicit_velocities(
    v: torch.Tensor, v_old: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit policies ``v+ = beta v + (1 - beta) v_old`` and ``v- = (1 + beta) v_old - beta v``.

    They are mirror images about ``v_old`` (``v+ + v- = 2 v_old``, ``v+ - v- = 2 beta (v - v_old)``), and
    both equal ``v_old`` when ``v = v_old``. ``v_old`` is used as given; :func:`nft_loss` detaches it.
    """
    check(beta > 0, "beta", f"must be > 0, got {beta}")
    check(v.shape == v_old.shape, "v_old", f"shape {tuple(v_old.shape)} must match v {tuple(v.shape)}")
    return beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v


def adaptive_weight(x0_pred: torch.Tensor, x0: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive per-sample weight: the stop-gradient mean absolute x0 error, ``max(mean|x0_pred - x0|, eps)``.

    As in the released code, the mean runs over all non-batch dims (channels and pixels; no other
    normalisation: not by t, nor by the norm of x0), is computed in float64 without gradient, and is
    clamped below by ``eps`` (1e-5 there). The loss divides the per-sample *mean squared* x0 error by it,
    so each sample's term is ``MSE / sg(MAE)``: samples and timesteps with large errors (large t) are not
    allowed to dominate, and the gradient has the size of an L1 regression's. Returns (B,) float64.
    """
    check(eps > 0, "eps", f"must be > 0, got {eps}")
    check(
        x0_pred.shape == x0.shape, "x0_pred", f"shape {tuple(x0_pred.shape)} must match x0 {tuple(x0.shape)}"
    )
    with torch.no_grad():
        return _mean_over_sample((x0_pred.detach().double() - x0.detach().double()).abs()).clamp(min=eps)


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | float,
    x0: torch.Tensor,
    adv: torch.Tensor,
    beta: float = 1.0,
    adv_max: float = 5.0,
    adaptive: bool = True,
    eps: float = 1e-5,
    scale_by_adv_max: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss on one batch of re-noised clean samples, averaged over the batch.

    Per sample (``D`` = number of elements of one sample, ``||.||^2 / D`` = mean over channels and pixels):

        pos = ||x0(v+) - x0||^2 / D / w+,   neg = ||x0(v-) - x0||^2 / D / w-
        L_i = (r pos + (1 - r) neg) / beta,  loss = mean_i L_i * (A_max if scale_by_adv_max else 1)

    with ``x0(v) = x_t - t v``, ``v+-`` from :func:`implicit_velocities`, ``r`` from :func:`optimality` and
    ``w+- = adaptive_weight(x0(v+-), x0, eps)`` (``adaptive=False``: ``w+- = 1``). The weights divide the
    per-sample mean squared error and carry no gradient. The ``1/beta`` and ``A_max`` factors are the
    released code's (``policy_loss = (r * pos / beta + (1 - r) * neg / beta) * adv_clip_max``); together
    they make the on-policy gradient ``clip(A) / w`` times the flow-matching gradient, whatever beta is.

    Args:
        v: (B, ...) velocity of the trained policy; gradients flow through it only.
        v_old: (B, ...) velocity of the old policy at the same ``x_t``; detached here (a constant).
        x_t: (B, ...) noised samples, ``forward_noise(x0, t, eps)``.
        t: (B,) or float, the noise level of each sample.
        x0: (B, ...) clean samples (the old policy's generations).
        adv: (B,) advantages (group-normalised rewards).
        beta: strength of the implicit guidance (released code: 1.0, 0.1 for OCR and multi-reward).
        adv_max: advantage clip of the optimality probability (released code: 5).
        adaptive: use the adaptive weights (released code: always on).
        eps: lower clamp of the adaptive weights.
        scale_by_adv_max: multiply the loss by ``adv_max`` as the released code does.

    Returns the loss (0-dim, in at least float32) and detached statistics: ``r_mean``, ``positive`` and
    ``negative`` (batch means of ``pos`` and ``neg``), ``weight_pos`` / ``weight_neg`` (batch means of
    ``w+-``), ``fm`` (batch mean of the unweighted ``||x0(v) - x0||^2 / D``) and ``old_deviation``
    (``mean((v - v_old)^2)``).
    """
    check(v.ndim >= 1 and v.shape[0] >= 1, "v", f"must be (B, ...) with B >= 1, got {tuple(v.shape)}")
    for name, x in (("x_t", x_t), ("x0", x0)):
        check(x.shape == v.shape, name, f"shape {tuple(x.shape)} must match v {tuple(v.shape)}")
    check(
        adv.shape == (v.shape[0],), "adv", f"must be ({v.shape[0]},), one per sample, got {tuple(adv.shape)}"
    )
    dtype = torch.promote_types(v.dtype, torch.float32)
    v_old = v_old.detach()
    v_pos, v_neg = implicit_velocities(v, v_old, beta)
    r = optimality(adv.detach(), adv_max).to(dtype)
    x0_pos, x0_neg = x0_from_velocity(x_t, t, v_pos), x0_from_velocity(x_t, t, v_neg)
    se_pos = _mean_over_sample(((x0_pos - x0) ** 2).to(dtype))
    se_neg = _mean_over_sample(((x0_neg - x0) ** 2).to(dtype))
    if adaptive:
        w_pos = adaptive_weight(x0_pos, x0, eps).to(dtype)
        w_neg = adaptive_weight(x0_neg, x0, eps).to(dtype)
    else:
        w_pos = w_neg = torch.ones_like(se_pos)
    pos, neg = se_pos / w_pos, se_neg / w_neg
    per_sample = (r * pos + (1 - r) * neg) / beta
    loss = per_sample.mean() * (adv_max if scale_by_adv_max else 1.0)
    with torch.no_grad():
        stats = {
            "r_mean": r.mean(),
            "positive": pos.mean(),
            "negative": neg.mean(),
            "weight_pos": w_pos.mean(),
            "weight_neg": w_neg.mean(),
            "fm": _mean_over_sample(((x0_from_velocity(x_t, t, v) - x0) ** 2).to(dtype)).mean(),
            "old_deviation": ((v.detach() - v_old) ** 2).to(dtype).mean(),
        }
    return loss, stats


def unshift(t: float, shift: float) -> float:
    """The inverse of the resolution shift ``t = s u / (1 + (s - 1) u)``: ``u = t / (s - (s - 1) t)``, the
    uniform draw that the shift maps to ``t`` (monotone, 0 -> 0 and 1 -> 1). Turns a range of ``t`` into the
    ``[t_min, t_max)`` of :func:`sample_training_timesteps`'s ``uniform`` draws."""
    check(shift > 0, "shift", f"must be > 0, got {shift}")
    check(0.0 <= t <= 1.0, "t", f"must lie in [0, 1], got {t}")
    return t / (shift - (shift - 1) * t)


def sample_training_timesteps(
    n: int,
    mode: str = "uniform",
    generator: torch.Generator | None = None,
    sigmas: torch.Tensor | None = None,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    per_sample: int | None = None,
) -> torch.Tensor:
    """Noise levels at which to re-noise each of ``n`` clean samples for the DiffusionNFT loss.

    * ``mode="uniform"``: ``u ~ U[t_min, t_max)``, then the model's resolution shift
      ``t = s u / (1 + (s - 1) u)`` (``shift=1`` leaves u as is; SD3/SD3.5 use 3). The shift is monotone, so
      the result lies in ``[shift(t_min), shift(t_max))``.
    * ``mode="grid"``: drawn uniformly among the sampler's ``sigmas`` that are > 0 (the trailing 0 of a
      schedule is skipped). This is what the released code does: it trains on the sampler's own timesteps
      (10 for SD3.5-M), each sample on a random ``int(0.99 * N)`` of the N of them, without repetition.
      ``shift``, ``t_min`` and ``t_max`` are not used: the sigmas are already the model's.

    ``per_sample=None`` returns shape (n,); ``per_sample=k`` returns (n, k): k independent uniform draws,
    or for ``grid`` k *distinct* grid points per sample (a random permutation's first k, as the released
    code's per-sample shuffle). The draws come from ``generator`` (the global RNG if None) on the CPU, so
    the same generator state gives the same timesteps. Float32 for ``uniform``, the sigmas' dtype for
    ``grid``.
    """
    check(mode in TIMESTEP_MODES, "mode", f"must be one of {TIMESTEP_MODES}, got {mode!r}")
    check(isinstance(n, int) and n >= 1, "n", f"must be an integer >= 1, got {n!r}")
    check(
        per_sample is None or (isinstance(per_sample, int) and per_sample >= 1),
        "per_sample",
        f"must be None or an integer >= 1, got {per_sample!r}",
    )
    k = 1 if per_sample is None else per_sample
    if mode == "uniform":
        check(shift > 0, "shift", f"must be > 0, got {shift}")
        check(0.0 <= t_min < t_max <= 1.0, "t_min", f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        u = t_min + (t_max - t_min) * torch.rand((n, k), generator=generator)
        out = shift * u / (1 + (shift - 1) * u)
    else:
        check(sigmas is not None, "sigmas", "mode='grid' needs the sampler's sigmas")
        sig = torch.as_tensor(sigmas).detach().cpu()
        check(sig.ndim == 1, "sigmas", f"must be 1-D, got shape {tuple(sig.shape)}")
        grid = sig[sig > 0]
        check(grid.numel() >= 1, "sigmas", "has no entry > 0")
        check(
            k <= grid.numel(),
            "per_sample",
            f"asks for {k} distinct timesteps but the grid has only {grid.numel()} nonzero sigmas",
        )
        idx = torch.rand((n, grid.numel()), generator=generator).argsort(dim=1)[:, :k]
        out = grid[idx]
    return out[:, 0] if per_sample is None else out
