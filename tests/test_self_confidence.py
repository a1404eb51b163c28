"""The SOLACE self-confidence reward (Eqs. 9-14) against closed forms of an analytic velocity field."""

from __future__ import annotations

import math

import pytest
import torch
from mathcheck import assert_close

from solace.errors import ConfigError
from solace.rewards.self_confidence import (
    aggregate,
    antithetic_probes,
    confidence_scores,
    draw_probes,
    probe_mse,
    self_confidence,
    standardize_per_timestep,
    timestep_weights,
)

LATENT = (2, 3, 3)
D = 2 * 3 * 3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def point_field(xstar):
    """The exact velocity when the data is a single point x* (one per sample): v(z_t, t) = (z_t - x*) / t."""

    def velocity_fn(zt, t, idx):
        return (zt - xstar[idx]) / t.reshape(-1, *([1] * (zt.ndim - 1))).to(zt.dtype)

    return velocity_fn


def closed_form_scores(z0, xstar, ts, delta):
    """S_t = -log(||z0 - x*||^2 / (t^2 D) + delta), shape (B, T)."""
    sq = ((z0 - xstar) ** 2).flatten(1).sum(1).double()
    t = torch.as_tensor(ts, dtype=torch.float64)
    return -torch.log(sq[:, None] / (t[None] ** 2 * D) + delta)


# ---------------------------------------------------------------------------------------------- probes


@pytest.mark.parametrize("K", [2, 4, 8, 16])
def test_antithetic_probes_cancel_exactly(K):
    p = antithetic_probes(K, LATENT, _gen())
    assert p.shape == (K, *LATENT)
    for m in range(K // 2):
        assert torch.equal(p[m + K // 2], -p[m])
    # each antithetic pair cancels bit for bit, so the probes sum to exactly zero (== 0, no tolerance)
    assert ((p[: K // 2] + p[K // 2 :]).sum(0) == 0).all()
    assert (p[: K // 2] != 0).any()


def test_antithetic_probes_batch_shape_and_reproducibility():
    p = antithetic_probes(4, LATENT, _gen(3), batch_shape=(2, 5))
    assert p.shape == (2, 5, 4, *LATENT)
    assert torch.equal(p[:, :, 2:], -p[:, :, :2])
    assert ((p[:, :, :2] + p[:, :, 2:]) == 0).all()
    assert torch.equal(p, antithetic_probes(4, LATENT, _gen(3), batch_shape=(2, 5)))


@pytest.mark.parametrize(
    ("mode", "shape"), [("group", (6, *LATENT)), ("per_sample_timestep", (3, 4, 6, *LATENT))]
)
def test_draw_probes_shapes(mode, shape):
    p = draw_probes(6, LATENT, num_samples=3, num_timesteps=4, mode=mode, generator=_gen())
    assert p.shape == shape
    assert torch.equal(p[..., 3:, :, :, :], -p[..., :3, :, :, :])


@pytest.mark.parametrize("K", [3, 5, 1, 0, -2])
def test_bad_num_probes_raise_config_error(K):
    with pytest.raises(ConfigError) as exc:
        antithetic_probes(K, LATENT)
    assert exc.value.field == "num_probes"
    assert "num_probes" in str(exc.value)


def test_draw_probes_bad_mode():
    with pytest.raises(ConfigError) as exc:
        draw_probes(4, LATENT, 2, 3, mode="per_sample")
    assert exc.value.field == "probe_mode"


def test_probe_mse_rejects_odd_k_in_given_probes_and_bad_shapes():
    z0 = torch.zeros(2, *LATENT)
    fn = point_field(z0)
    with pytest.raises(ConfigError) as exc:
        probe_mse(fn, z0, [0.5], torch.randn(3, *LATENT))
    assert exc.value.field == "num_probes"
    with pytest.raises(ConfigError) as exc:
        probe_mse(fn, z0, [0.5], torch.randn(4, 2, 3, 4))
    assert exc.value.field == "probes"
    with pytest.raises(ConfigError) as exc:
        probe_mse(fn, z0, [0.5, 0.0], torch.randn(4, *LATENT))
    assert exc.value.field == "timesteps"
    with pytest.raises(ConfigError) as exc:
        probe_mse(fn, z0, [0.5], torch.randn(4, *LATENT), max_batch=0)
    assert exc.value.field == "max_batch"


# ---------------------------------------------------------------------------------- analytic point field


def test_reward_is_exactly_minus_log_delta_at_the_data_point():
    """z0 = x* = 0 with dyadic t: every float operation is exact, so MSE == 0 and S == -log(delta)."""
    z0 = torch.zeros(3, *LATENT)
    ts = [1.0, 0.5, 0.25]
    probes = antithetic_probes(4, LATENT, _gen())
    r, s = self_confidence(point_field(z0), z0, ts, probes, delta=1e-3)
    expected = -torch.log(torch.tensor(1e-3))
    assert (s == expected).all()
    assert (r == expected).all()


@pytest.mark.parametrize("mode", ["group", "per_sample_timestep"])
def test_reward_at_a_generic_data_point_is_minus_log_delta(mode):
    xstar = torch.randn(3, *LATENT, generator=_gen(1), dtype=torch.float64)
    ts = torch.tensor([0.9, 0.6, 0.3])
    probes = draw_probes(4, LATENT, 3, 3, mode=mode, generator=_gen(2), dtype=torch.float64)
    r, s = self_confidence(point_field(xstar), xstar.clone(), ts, probes, delta=1e-3)
    assert_close(s, torch.full((3, 3), -math.log(1e-3), dtype=s.dtype), rtol=0, atol=1e-6)
    assert_close(r, torch.full((3,), -math.log(1e-3), dtype=r.dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["group", "per_sample_timestep"])
@pytest.mark.parametrize("delta", [1e-3, 0.5])
def test_reward_matches_closed_form_per_timestep(mode, delta):
    B = 4
    xstar = torch.randn(B, *LATENT, generator=_gen(1), dtype=torch.float64)
    scale = torch.tensor([0.0, 0.01, 0.3, 1.0], dtype=torch.float64).reshape(B, 1, 1, 1)
    z0 = xstar + scale * torch.randn(B, *LATENT, generator=_gen(2), dtype=torch.float64)
    ts = [1.0, 0.8, 0.5, 0.2]
    probes = draw_probes(6, LATENT, B, len(ts), mode=mode, generator=_gen(3), dtype=torch.float64)
    r, s = self_confidence(point_field(xstar), z0, ts, probes, delta=delta)
    expected = closed_form_scores(z0, xstar, ts, delta)
    assert s.shape == (B, len(ts)) and r.shape == (B,)
    assert_close(s.double(), expected, rtol=1e-5, atol=1e-5)
    # uniform weights: the reward is the plain mean over timesteps (Eqs. 13-14)
    assert_close(r.double(), expected.mean(1), rtol=1e-5, atol=1e-5)
    # closer to the data point -> more confident
    assert (r[:-1] > r[1:]).all()


def _hand_mse(z0, ts, probes):
    """With v = t (constant), eps_hat = z0 + t, so MSE[b, t] = mean_k mean((z0[b] + t - eps[b, t, k])^2)."""
    B, T = z0.shape[0], len(ts)
    out = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for j, t in enumerate(ts):
            eps = probes if probes.ndim == z0.ndim else probes[b, j]
            out[b, j] = ((z0[b] + t - eps) ** 2).flatten(1).mean(1).mean()
    return out


def _const_t_field(zt, t, idx):
    return t.reshape(-1, *([1] * (zt.ndim - 1))).to(zt.dtype).expand_as(zt)


@pytest.mark.parametrize("mode", ["group", "per_sample_timestep"])
def test_probe_mse_indexing_and_chunking(mode):
    """Rows reach velocity_fn with the right (sample, timestep, probe); max_batch chunking changes nothing."""
    B, ts = 3, [0.9, 0.5, 0.1]
    z0 = torch.randn(B, *LATENT, generator=_gen(4), dtype=torch.float64)
    probes = draw_probes(4, LATENT, B, len(ts), mode=mode, generator=_gen(5), dtype=torch.float64)
    ref = _hand_mse(z0, ts, probes)
    results = [probe_mse(_const_t_field, z0, ts, probes, max_batch=mb) for mb in (1, 5, 7, 36, 1000)]
    assert_close(results[0].double(), ref, rtol=1e-6, atol=1e-6)
    for res in results[1:]:
        assert torch.equal(res, results[0])


def test_reward_independent_of_max_batch():
    xstar = torch.randn(2, *LATENT, generator=_gen(6))
    z0 = xstar + 0.1 * torch.randn(2, *LATENT, generator=_gen(7))
    probes = antithetic_probes(4, LATENT, _gen(8))
    out = [self_confidence(point_field(xstar), z0, [0.9, 0.4], probes, max_batch=mb) for mb in (1, 3, 256)]
    for r, s in out[1:]:
        assert_close(r, out[0][0], rtol=0, atol=1e-6)
        assert_close(s, out[0][1], rtol=0, atol=1e-6)


def test_velocity_fn_receives_sample_index_rows():
    seen = []

    def fn(zt, t, idx):
        seen.append(idx.clone())
        return torch.zeros_like(zt)

    probe_mse(fn, torch.zeros(3, *LATENT), [0.5, 0.25], antithetic_probes(2, LATENT, _gen()), max_batch=5)
    assert [len(i) for i in seen] == [5, 5, 2]
    assert torch.cat(seen).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


# -------------------------------------------------------------------------------- scores and aggregation


def test_confidence_scores():
    mse = torch.tensor([[0.0, 1.0], [0.5, 2.0]])
    assert_close(confidence_scores(mse, 0.25), -torch.log(mse + 0.25))


@pytest.mark.parametrize("delta", [0.0, -1e-3])
def test_non_positive_delta_raises(delta):
    with pytest.raises(ConfigError) as exc:
        confidence_scores(torch.ones(2, 2), delta)
    assert exc.value.field == "delta" and "delta" in str(exc.value)
    z0 = torch.zeros(2, *LATENT)
    with pytest.raises(ConfigError) as exc:
        self_confidence(point_field(z0), z0, [0.5], antithetic_probes(2, LATENT), delta=delta)
    assert exc.value.field == "delta"


def test_aggregate_uniform_is_mean_over_timesteps():
    s = torch.tensor([[1.0, 2.0, 6.0], [3.0, 5.0, 1.0]])
    assert_close(aggregate(s, torch.tensor([0.9, 0.5, 0.1])), torch.tensor([3.0, 3.0]))


def test_aggregate_t_one_minus_t_weighting():
    s = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    ts = torch.tensor([0.5, 0.25])
    assert_close(timestep_weights(ts, "t(1-t)"), torch.tensor([0.25, 0.1875]))
    # (0.25 * 1 + 0.1875 * 2) / 0.4375 and (0.25 * 3 + 0.1875 * 5) / 0.4375
    expected = torch.tensor([0.625 / 0.4375, 1.6875 / 0.4375])
    assert_close(aggregate(s, ts, weighting="t(1-t)"), expected)
    # t = 1 gets zero weight under t(1-t)
    assert_close(
        aggregate(torch.tensor([[7.0, 2.0]]), torch.tensor([1.0, 0.5]), "t(1-t)"), torch.tensor([2.0])
    )


def test_aggregate_all_zero_weights_and_unknown_weighting_raise():
    with pytest.raises(ConfigError) as exc:
        aggregate(torch.ones(2, 1), torch.tensor([1.0]), weighting="t(1-t)")
    assert exc.value.field == "weighting"
    with pytest.raises(ConfigError) as exc:
        aggregate(torch.ones(2, 1), torch.tensor([0.5]), weighting="linear")
    assert exc.value.field == "weighting"


def test_per_timestep_standardisation():
    s = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    # column 0: mean 2, std 1; column 1: mean 4, std 2 (population std)
    expected = torch.tensor([[-1 / (1 + 1e-6), -2 / (2 + 1e-6)], [1 / (1 + 1e-6), 2 / (2 + 1e-6)]])
    assert_close(standardize_per_timestep(s), expected)
    assert_close(aggregate(s, torch.tensor([0.5, 0.25]), standardize=True), expected.mean(1))
    # a single sample has nothing to standardise against
    assert torch.equal(standardize_per_timestep(s[:1]), torch.zeros(1, 2))
    # off by default
    assert_close(aggregate(s, torch.tensor([0.5, 0.25])), torch.tensor([1.5, 4.5]))


def test_self_confidence_switches_pass_through():
    xstar = torch.randn(3, *LATENT, generator=_gen(9), dtype=torch.float64)
    z0 = xstar + torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    ts = torch.tensor([0.8, 0.5, 0.2])
    probes = antithetic_probes(2, LATENT, _gen(), dtype=torch.float64)
    r, s = self_confidence(point_field(xstar), z0, ts, probes, weighting="t(1-t)", standardize=True)
    assert_close(r, aggregate(s, ts, weighting="t(1-t)", standardize=True))
    assert abs(r.sum().item()) < 1e-5  # standardised columns have zero mean across the batch


def test_scalar_latents_give_one_score_per_sample():
    xstar = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    z0 = xstar + torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    probes = antithetic_probes(2, (), _gen(), dtype=torch.float64)
    mse = probe_mse(point_field(xstar), z0, [0.5, 0.25], probes)
    expected = torch.tensor([[0.0, 0.0], [1.0, 4.0], [4.0, 16.0]])  # (z0 - x*)^2 / t^2
    assert_close(mse, expected)
