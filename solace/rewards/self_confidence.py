"""The self-confidence reward of SOLACE (paper Sec. 3.2, Eqs. 9-14), model-agnostic.

A generated clean latent ``z0`` is re-noised with K probe noises at the sampler's own timesteps; the model
predicts each probe back from its *conditional* velocity, ``eps_hat = v(z_t, t, c) + z0`` (Eq. 10, since
``v = eps - z0`` under ``z_t = (1 - t) z0 + t eps``). The better it recovers its own noise, the more
confident it is in ``z0``:

    MSE_t = 1/K sum_m ||eps_hat_m - eps_m||^2 / D           (Eq. 11, D = latent size)
    S_t   = -log(MSE_t + delta)                             (Eq. 12)
    R     = sum_t w(t) S_t / sum_t w(t),   w(t) = 1          (Eqs. 13-14)

Probes are antithetic (``eps[m + K/2] = -eps[m]``, Eq. 9) and shared by every sample of a prompt group so
that within-group differences come from the samples, not from the probes.

The authors' released code departs from the paper in places; each is a switch here, off by default:
``standardize`` (S_t standardised per timestep across the batch, or across each batch of ``batch_ids``:
:func:`standardization_batches`) and ``weighting="t(1-t)"``. Probes per sample and per timestep are
supported by passing probes of shape (B, T, K, ...) (:func:`draw_probes`), and independent (not antithetic)
probes, as the released FLUX script draws them, by ``antithetic=False``.

These are the pure functions; :class:`solace.rewards.scorer.SelfConfidenceScorer` binds them to a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from solace.errors import check

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity_fn(z_t, t, sample_index) -> v``: batched conditional velocity; ``sample_index`` (N,) says
which of the B samples (and so which prompt conditioning) each row belongs to."""

WEIGHTINGS = ("uniform", "t(1-t)")


def check_num_probes(num_probes: int, field: str = "num_probes", antithetic: bool = True) -> None:
    """K must be an even integer >= 2: the probes come in antithetic pairs (Eq. 9); independent probes
    (``antithetic=False``) need only K >= 1. The one check of K."""
    check(isinstance(num_probes, int), field, f"must be an integer, got {num_probes!r}")
    if not antithetic:
        check(num_probes >= 1, field, f"must be >= 1, got {num_probes}")
        return
    check(
        num_probes >= 2 and num_probes % 2 == 0,
        field,
        f"must be an even number >= 2 (antithetic pairs eps[m+K/2] = -eps[m]), got {num_probes}",
    )


def _gaussian(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal draws of ``shape``, made where ``generator`` lives (a CPU generator draws on the CPU,
    so the numbers do not depend on the device) and moved to ``device``."""
    out = torch.randn(
        tuple(shape),
        generator=generator,
        dtype=dtype,
        device="cpu" if generator is not None and generator.device.type == "cpu" else device,
    )
    return out.to(device) if device is not None else out


def antithetic_probes(
    num_probes: int,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_shape: Sequence[int] = (),
) -> torch.Tensor:
    """K antithetic Gaussian probes (Eq. 9): draws K/2 noises and appends their negatives.

    Returns shape ``(*batch_shape, K, *shape)``; along the K axis ``out[m + K/2] == -out[m]`` exactly, so
    each antithetic pair sums to exactly zero (``out[:K/2] + out[K/2:] == 0``). A plain ``sum`` over the K
    axis is zero only up to float rounding for K >= 4, since it adds the probes in order.
    """
    check_num_probes(num_probes)
    half = _gaussian((*batch_shape, num_probes // 2, *shape), generator, device, dtype)
    return torch.cat([half, -half], dim=len(batch_shape))


def independent_probes(
    num_probes: int,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_shape: Sequence[int] = (),
) -> torch.Tensor:
    """K independent Gaussian probes, shape ``(*batch_shape, K, *shape)``: no antithetic pairing, any
    K >= 1. The released FLUX script (wookiekim/SOLACE ``scripts/train_flux_self_accelerate.py``,
    ``sds_self_confidence_scalar_flux``) draws its K = 4 probes this way; its SD3 script pairs them
    (Eq. 9)."""
    check_num_probes(num_probes, antithetic=False)
    return _gaussian((*batch_shape, num_probes, *shape), generator, device, dtype)


def draw_probes(
    num_probes: int,
    latent_shape: Sequence[int],
    num_samples: int,
    num_timesteps: int,
    mode: str = "group",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    antithetic: bool = True,
) -> torch.Tensor:
    """Probes for one prompt group of ``num_samples``.

    ``mode="group"`` (paper): one set of K probes, shape (K, *latent), shared by every sample and timestep.
    ``mode="per_sample_timestep"`` (released code): fresh probes per sample and timestep, (B, T, K, *latent).
    ``antithetic`` (paper, Eq. 9, and the released SD3 script): pairs ``eps[m + K/2] = -eps[m]``; False:
    K independent draws (the released FLUX script).
    """
    check(
        mode in ("group", "per_sample_timestep"),
        "probe_mode",
        f"must be 'group' or 'per_sample_timestep', got {mode!r}",
    )
    draw = antithetic_probes if antithetic else independent_probes
    batch = () if mode == "group" else (num_samples, num_timesteps)
    return draw(num_probes, latent_shape, generator, device, dtype, batch)


def renoise(z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Forward process of rectified flow, ``z_t = (1 - t) z0 + t eps`` (Eq. 1); ``t`` broadcast per row."""
    tb = t.reshape(-1, *([1] * (z0.ndim - 1))).to(z0.dtype)
    return (1 - tb) * z0 + tb * eps


@torch.no_grad()
def probe_mse(
    velocity_fn: VelocityFn,
    z0: torch.Tensor,
    timesteps: torch.Tensor | Sequence[float],
    probes: torch.Tensor,
    max_batch: int = 256,
    antithetic: bool = True,
) -> torch.Tensor:
    """Per-sample, per-timestep denoising error MSE_t (Eq. 11), shape (B, T).

    All B*T*K forwards are flattened and sent to ``velocity_fn`` in chunks of at most ``max_batch`` rows.
    ``probes`` is (K, *latent) (shared) or (B, T, K, *latent) (per sample and timestep); K must be even
    unless ``antithetic`` is False (independent probes).
    """
    B, lat = z0.shape[0], tuple(z0.shape[1:])
    ts = torch.as_tensor(timesteps, dtype=torch.float32, device=z0.device).reshape(-1)
    T = ts.numel()
    check(T >= 1, "timesteps", "must hold at least one timestep")
    check(bool(((ts > 0) & (ts <= 1)).all()), "timesteps", f"must lie in (0, 1], got {ts.tolist()}")
    if probes.ndim == z0.ndim:  # (K, *latent): shared by the group
        K = probes.shape[0]
        check(
            tuple(probes.shape[1:]) == lat,
            "probes",
            f"shape {tuple(probes.shape)} does not match latents {lat}",
        )
        eps = probes.to(z0.device, z0.dtype).reshape(1, 1, K, *lat).expand(B, T, K, *lat)
    else:
        check(
            tuple(probes.shape[:2]) == (B, T) and tuple(probes.shape[3:]) == lat,
            "probes",
            f"shape {tuple(probes.shape)} must be (K, *latent) or (B={B}, T={T}, K, *latent)",
        )
        K = probes.shape[2]
        eps = probes.to(z0.device, z0.dtype)
    check_num_probes(K, antithetic=antithetic)
    check(
        isinstance(max_batch, int) and max_batch >= 1,
        "max_batch",
        f"must be an integer >= 1, got {max_batch!r}",
    )
    n = B * T * K
    eps_flat = eps.reshape(n, *lat)
    sample_idx = torch.arange(B, device=z0.device).repeat_interleave(T * K)
    t_flat = ts.repeat_interleave(K).repeat(B)
    err = torch.empty(n, device=z0.device, dtype=torch.float32)
    for s in range(0, n, max_batch):
        e = slice(s, min(s + max_batch, n))
        zc = z0[sample_idx[e]]
        zt = renoise(zc, t_flat[e], eps_flat[e])
        v = velocity_fn(zt, t_flat[e], sample_idx[e])
        eps_hat = v.to(zc.dtype) + zc  # Eq. 10
        err[e] = ((eps_hat - eps_flat[e]) ** 2).float().reshape(zc.shape[0], -1).mean(1)
    return err.reshape(B, T, K).mean(-1)


def confidence_scores(mse: torch.Tensor, delta: float = 1e-3) -> torch.Tensor:
    """S_t = -log(MSE_t + delta) (Eq. 12)."""
    check(delta > 0, "delta", f"must be > 0 (it keeps -log finite), got {delta}")
    return -torch.log(mse + delta)


EDIT_AGGREGATES = ("mean", "max", "lse")


def edit_contrast(
    s_c: torch.Tensor, s_edits: torch.Tensor, mode: str = "mean", temperature: float = 1.0
) -> torch.Tensor:
    """Self-confidence of the prompt against its minimal edits, per timestep (a Diffusion-Classifier
    reading of S_t: the same image, probes and timesteps under competing prompts, so the image's own
    difficulty cancels). ``s_c`` (B, T) scores prompt c, ``s_edits`` (B, E, T) its E edits c'.

    * ``mean``: ``S(c) - mean_e S(c'_e)``;  ``max``: ``S(c) - max_e S(c'_e)``;
    * ``lse``: the log-posterior of c among {c, c'_1..E} under a softmax with temperature tau,
      ``S(c) - tau * log sum_{x in {c, c'}} exp(S(x) / tau)`` (<= 0; 0 when c explains the image alone).
    """
    check(mode in EDIT_AGGREGATES, "edits", f"must be one of {EDIT_AGGREGATES}, got {mode!r}")
    check(s_edits.ndim == 3 and s_edits.shape[0] == s_c.shape[0], "s_edits", "must be (B, E, T)")
    if mode == "mean":
        return s_c - s_edits.mean(1)
    if mode == "max":
        return s_c - s_edits.max(1).values
    check(temperature > 0, "edit_temperature", f"must be > 0, got {temperature}")
    both = torch.cat([s_c.unsqueeze(1), s_edits], 1) / temperature
    return s_c - temperature * torch.logsumexp(both, 1)


def timestep_weights(timesteps: torch.Tensor, weighting: str = "uniform") -> torch.Tensor:
    """w(t) of Eq. 13: ``uniform`` (paper, w = 1) or ``t(1-t)`` (authors' released code)."""
    check(weighting in WEIGHTINGS, "weighting", f"must be one of {WEIGHTINGS}, got {weighting!r}")
    ts = torch.as_tensor(timesteps, dtype=torch.float32)
    return torch.ones_like(ts) if weighting == "uniform" else ts * (1 - ts)


def standardize_per_timestep(
    scores: torch.Tensor, eps: float = 1e-6, batch_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Released-code variant: standardise each S_t column across the batch, (S - mean_b) / (std_b + eps).

    ``batch_ids`` (B,): standardise the rows of each batch id on their own (the released code standardises
    over each sampling batch of one process: wookiekim/SOLACE ``scripts/train_sd3_self.py``,
    ``sds_self_confidence_scalar`` is called once per batch of ``sample.train_batch_size`` images). A batch of
    one row has nothing to standardise against and gets zeros. The released code divides by the sample
    std (ddof 1) clamped at 1e-6, this by the population std + 1e-6: with batches of one size n the two
    differ by the constant factor sqrt(n / (n - 1)), which the group-relative advantages cancel.
    """
    if batch_ids is not None:
        check(
            batch_ids.shape == scores.shape[:1],
            "batch_ids",
            f"must hold one id per row ({scores.shape[0]}), got shape {tuple(batch_ids.shape)}",
        )
        out = torch.empty_like(scores)
        for b in torch.unique(batch_ids).tolist():
            rows = (batch_ids == b).nonzero().flatten()
            out[rows] = standardize_per_timestep(scores[rows], eps)
        return out
    if scores.shape[0] < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean(0, keepdim=True)) / (scores.std(0, unbiased=False, keepdim=True) + eps)


def standardization_batches(
    num_samples: int,
    batch_size: int,
    group_size: int = 1,
    shuffle_groups: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The standardisation batch of each of an iteration's ``num_samples`` samples (global index order,
    prompt group after prompt group), (N,) batch ids.

    * ``shuffle_groups = 0``: batches of ``batch_size`` consecutive samples (sample ``i`` in batch
      ``i // batch_size``): each process's own sampling batches when ``batch_size`` divides its share.
    * ``shuffle_groups = m > 0``: as the released code deals its images (wookiekim/SOLACE
      ``DistributedKRepeatSampler`` in ``scripts/train_sd3_self.py``: each sampling round repeats
      ``processes * batch / G`` prompts G times, shuffles them and gives each process ``batch`` of them):
      the samples of each run of ``m`` whole prompt groups (``m * group_size`` samples; the whole
      iteration when it holds fewer groups, as a sampling round larger than the iteration) are permuted by
      ``generator`` and cut into batches of ``batch_size``, so a batch mixes prompts.

    Membership depends on the global sample index only, never on the number of processes: 1 and N
    processes standardise the same batches.
    """
    check(batch_size >= 1, "standardize_batch", f"must be >= 1, got {batch_size}")
    check(
        num_samples % batch_size == 0,
        "standardize_batch",
        f"{num_samples} samples do not split into batches of {batch_size}",
    )
    if shuffle_groups == 0:
        return torch.arange(num_samples) // batch_size
    run = min(shuffle_groups * group_size, num_samples)
    check(
        num_samples % run == 0 and run % batch_size == 0,
        "standardize_shuffle_groups",
        f"runs of {shuffle_groups} groups x {group_size} = {run} samples must split the {num_samples} "
        f"samples and split into batches of {batch_size}",
    )
    ids = torch.empty(num_samples, dtype=torch.long)
    per_run = run // batch_size
    for r in range(num_samples // run):
        perm = torch.randperm(run, generator=generator)
        ids[r * run + perm] = r * per_run + torch.arange(run) // batch_size
    return ids


def aggregate(
    scores: torch.Tensor,
    timesteps: torch.Tensor,
    weighting: str = "uniform",
    standardize: bool = False,
    batch_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """R = sum_t w(t) S_t / sum_t w(t) (Eqs. 13-14) over a (B, T) score matrix; returns (B,). With
    ``standardize``, S_t is first standardised per timestep over the whole matrix, or over each batch of
    ``batch_ids`` (:func:`standardize_per_timestep`).

    The released code averages ``w(t) z_t`` over all ``T'`` columns of its score matrix, the unprobed ones
    (zero) included, instead of dividing by ``sum_t w(t)``: a constant factor the advantages cancel.
    """
    w = timestep_weights(timesteps, weighting).to(scores.device, scores.dtype)
    check(bool(w.sum() > 0), "weighting", "all timestep weights are zero (t(1-t) vanishes at t=0 and t=1)")
    s = standardize_per_timestep(scores, batch_ids=batch_ids) if standardize else scores
    return (s * w).sum(-1) / w.sum()


def self_confidence(
    velocity_fn: VelocityFn,
    z0: torch.Tensor,
    timesteps: torch.Tensor | Sequence[float],
    probes: torch.Tensor,
    delta: float = 1e-3,
    weighting: str = "uniform",
    standardize: bool = False,
    max_batch: int = 256,
    antithetic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SOLACE reward (Eqs. 9-14). Returns ``(R, S)``: rewards (B,) and per-timestep scores (B, T)."""
    check(delta > 0, "delta", f"must be > 0 (it keeps -log finite), got {delta}")
    mse = probe_mse(velocity_fn, z0, timesteps, probes, max_batch=max_batch, antithetic=antithetic)
    s = confidence_scores(mse, delta)
    ts = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
    return aggregate(s, ts, weighting, standardize), s
