"""GRPO pieces: group advantages, the PPO-clipped loss, the step KL, the training window, ConfigError."""

from __future__ import annotations

import math

import pytest
import torch
from mathcheck import assert_close

from solace.errors import ConfigError, SolaceError, check
from solace.grpo.advantages import group_advantages, group_ids_from_size
from solace.grpo.loss import gaussian_kl, ppo_clip_loss
from solace.grpo.window import parse_steps, train_window
from solace.sampling.sde import sde_step


def _field_error(call, field):
    with pytest.raises(ConfigError) as exc:
        call()
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")
    return exc.value


# ----------------------------------------------------------------------------------------------- errors


def test_config_error_names_the_field():
    err = ConfigError("num_probes", "must be even")
    assert err.field == "num_probes"
    assert str(err) == "num_probes: must be even"
    assert isinstance(err, ValueError) and isinstance(err, SolaceError)
    check(True, "x", "never raised")
    _field_error(lambda: check(False, "rho", "must lie in (0, 1]"), "rho")


# ------------------------------------------------------------------------------------------- advantages


def test_group_statistics_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0])
    adv = group_advantages(r[:6], group_size=3)
    std = math.sqrt(2 / 3)  # population std of [1, 2, 3]
    assert_close(adv, torch.tensor([-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0, 0.0]))
    # groups of two: [1, 2] -> mean 1.5, std 0.5; [0, 4] -> mean 2, std 2
    adv2 = group_advantages(r[[0, 1, 6, 7]], group_size=2, eps=0.0)
    assert_close(adv2, torch.tensor([-1.0, 1.0, -1.0, 1.0]))


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_zero_std_groups_give_zero_advantages(eps):
    # 0.1 * 3 does not divide back to 0.1 exactly: the group must still be exactly zero, not NaN or +-1
    r = torch.tensor([0.1, 0.1, 0.1, 7.0, 7.0, 7.0], dtype=torch.float64)
    adv = group_advantages(r, group_size=3, eps=eps)
    assert not torch.isnan(adv).any()
    assert torch.equal(adv, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(
        group_advantages(r, group_size=3, eps=eps, global_std=True)[:3], torch.zeros(3, dtype=r.dtype)
    )


def test_global_std_option():
    r = torch.tensor([1.0, 3.0, 10.0, 14.0])
    g_std = r.std(unbiased=False).item()  # sqrt(mean((r - 7)^2)) = sqrt(27.5)
    assert g_std == pytest.approx(math.sqrt(27.5))
    adv = group_advantages(r, group_size=2, global_std=True)
    assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (g_std + 1e-4))


def test_non_contiguous_group_ids():
    r = torch.tensor([1.0, 10.0, 3.0, 30.0, 2.0, 5.0])
    ids = torch.tensor([7, 2, 7, 2, 7, 11])
    adv = group_advantages(r, group_ids=ids, eps=0.0)
    s7 = math.sqrt(2 / 3)  # group 7: [1, 3, 2], mean 2
    assert_close(adv, torch.tensor([-1 / s7, -1.0, 1 / s7, 1.0, 0.0, 0.0]))
    # the same as the contiguous layout, permuted
    perm = torch.tensor([0, 2, 4, 1, 3, 5])
    contiguous = group_advantages(r[perm[:5]], group_ids=torch.tensor([0, 0, 0, 1, 1]), eps=0.0)
    assert_close(adv[perm[:5]], contiguous)


def test_advantage_clipping():
    r = torch.tensor([0.0, 0.0, 0.0, 10.0])  # population std sqrt(18.75); z-scores -0.577 (x3) and 1.732
    adv = group_advantages(r, group_size=4, eps=0.0, clip=1.0)
    assert_close(adv, torch.tensor([-1 / math.sqrt(3)] * 3 + [1.0]), rtol=1e-5)
    assert adv.max() == 1.0


def test_advantages_keep_dtype_and_group_ids_from_size():
    assert group_ids_from_size(6, 3).tolist() == [0, 0, 0, 1, 1, 1]
    assert (
        group_advantages(torch.tensor([1.0, 2.0], dtype=torch.float16), group_size=2).dtype == torch.float16
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"group_size": 4}, "group_size"),  # 6 rewards do not split into groups of 4
        ({"group_size": 0}, "group_size"),
        ({}, "group_size"),
        ({"group_ids": torch.tensor([0, 0, 1, 1])}, "group_ids"),
        ({"group_ids": torch.zeros(6, 1, dtype=torch.long)}, "group_ids"),
        ({"group_size": 3, "clip": 0.0}, "clip"),
        ({"group_size": 3, "eps": -1.0}, "eps"),
    ],
)
def test_advantage_errors_name_the_field(kwargs, field):
    _field_error(lambda: group_advantages(torch.arange(6.0), **kwargs), field)


def test_rewards_must_be_1d():
    _field_error(lambda: group_advantages(torch.zeros(2, 3), group_size=3), "rewards")


# ------------------------------------------------------------------------------------------------ PPO


def _parametrised_log_prob(theta, feats, x):
    """logp_i = -(x_i - f_i . theta)^2 / 2, whose gradient is (x_i - f_i . theta) f_i."""
    return -0.5 * (x - feats @ theta) ** 2


@pytest.mark.parametrize("detach_old", [True, False])
def test_on_policy_ratio_is_one_and_gradient_is_minus_a_grad_logp(detach_old):
    g = torch.Generator().manual_seed(0)
    N, P = 5, 3
    feats, x = (
        torch.randn(N, P, generator=g, dtype=torch.float64),
        torch.randn(N, generator=g, dtype=torch.float64),
    )
    theta = torch.randn(P, generator=g, dtype=torch.float64).requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 0.0, 2.0, -3.0], dtype=torch.float64)
    logp = _parametrised_log_prob(theta, feats, x)
    old = logp.detach() if detach_old else logp  # passing the live log-prob must not cancel the gradient
    loss, stats = ppo_clip_loss(logp, old, adv, clip_range=1e-4)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0
    assert_close(loss, -adv.mean())
    (grad,) = torch.autograd.grad(loss, theta)
    resid = (x - feats @ theta).detach()
    expected = -(adv[:, None] * resid[:, None] * feats).sum(0) / N
    assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_ppo_clipping_by_hand():
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros(4, dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, stats = ppo_clip_loss(logp, old, adv, clip_range=0.2)
    # per sample max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped)   r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    #   r=1.1, A=-1: max(1.1, 1.1)   =  1.1             r=0.7, A=-1: max(0.7, 0.8)   =  0.8 (clipped)
    assert_close(loss, torch.tensor((-1.2 - 0.5 + 1.1 + 0.8) / 4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlogp of -A r is -A r; the clipped terms carry no gradient
    assert_close(grad, torch.tensor([0.0, -0.5 / 4, 1.1 / 4, 0.0], dtype=torch.float64))
    assert stats["clipfrac"].item() == 0.75  # |r - 1| > 0.2 for 1.5, 0.5, 0.7
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1, 0.7)) / 4
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx(0.95)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert not stats["approx_kl"].requires_grad


def test_ppo_errors_name_the_field():
    z = torch.zeros(3)
    _field_error(lambda: ppo_clip_loss(z, z, z, clip_range=0.0), "clip_range")
    _field_error(lambda: ppo_clip_loss(z, z, torch.zeros(4)), "advantages")


# ------------------------------------------------------------------------------------------------- KL


def _kl_inputs():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    ref = mean + 0.1 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    std = torch.tensor([0.3, 0.7, 1.9], dtype=torch.float64).reshape(3, 1, 1, 1)
    dt = torch.tensor([-0.1, -0.05, -0.2], dtype=torch.float64)
    return mean, ref, std, dt


def test_gaussian_kl_flow_grpo_form():
    mean, ref, std, _ = _kl_inputs()
    D = 2 * 4 * 4
    expected = ((mean - ref) ** 2).sum(dim=(1, 2, 3)) / D / (2 * std.reshape(-1) ** 2)
    assert_close(gaussian_kl(mean, ref, std), expected)
    # a scalar std broadcasts
    assert_close(gaussian_kl(mean, ref, 0.5), ((mean - ref) ** 2).mean(dim=(1, 2, 3)) / (2 * 0.25))


@pytest.mark.parametrize("per_sample", [True, False])
def test_gaussian_kl_exact_form_equals_torch_kl(per_sample):
    mean, ref, std, dt = _kl_inputs()
    if not per_sample:
        std, dt = torch.tensor(0.6, dtype=torch.float64), -0.125
    step_std = std * torch.as_tensor(dt, dtype=torch.float64).abs().reshape(-1, 1, 1, 1).sqrt()
    p = torch.distributions.Normal(mean, step_std.expand_as(mean))
    q = torch.distributions.Normal(ref, step_std.expand_as(ref))
    expected = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3))
    exact = gaussian_kl(mean, ref, std, dt=dt, form="exact")
    assert_close(exact, expected, rtol=1e-10, atol=1e-12)
    # flow_grpo leaves out |dt|: it is the exact KL divided by |dt|
    assert_close(gaussian_kl(mean, ref, std), exact * torch.as_tensor(dt, dtype=torch.float64).abs())


def test_gaussian_kl_on_sde_steps():
    g = torch.Generator().manual_seed(1)
    z, v, v_ref = (torch.randn(2, 3, 5, generator=g) for _ in range(3))
    st = sde_step(z, v, 0.6, 0.5, noise_level=0.7, noise=torch.zeros_like(z))
    st_ref = sde_step(z, v_ref, 0.6, 0.5, noise_level=0.7, noise=torch.zeros_like(z))
    kl = gaussian_kl(st.mean, st_ref.mean, st.std, dt=-0.1, form="exact")
    p = torch.distributions.Normal(st.mean, st.std * math.sqrt(0.1))
    q = torch.distributions.Normal(st_ref.mean, st.std * math.sqrt(0.1))
    assert_close(kl, torch.distributions.kl_divergence(p, q).mean(dim=(1, 2)), rtol=1e-4)
    assert torch.equal(gaussian_kl(st.mean, st.mean, st.std), torch.zeros(2))


def test_gaussian_kl_errors_name_the_field():
    mean, ref, std, _ = _kl_inputs()
    _field_error(lambda: gaussian_kl(mean, ref, std, form="exact"), "dt")
    _field_error(lambda: gaussian_kl(mean, ref, std, form="reverse"), "kl_form")


# --------------------------------------------------------------------------------------------- window


@pytest.mark.parametrize(
    ("num_steps", "rho", "expected"),
    [
        (10, 0.6, [4, 5, 6, 7, 8, 9]),
        (10, 1.0, list(range(10))),
        (10, 0.7, [3, 4, 5, 6, 7, 8, 9]),
        (10, 0.3, [7, 8, 9]),
        (10, 0.05, [9]),
        (40, 0.6, list(range(16, 40))),
        (1, 0.6, [0]),
    ],
)
def test_train_window(num_steps, rho, expected):
    assert train_window(num_steps, rho) == expected


@pytest.mark.parametrize("rho", [0.0, 1.5, -0.1, float("nan")])
def test_train_window_bad_rho(rho):
    _field_error(lambda: train_window(10, rho), "rho")


@pytest.mark.parametrize("num_steps", [0, -1, 2.5])
def test_train_window_bad_num_steps(num_steps):
    _field_error(lambda: train_window(num_steps, 0.6), "num_steps")


def test_parse_steps():
    assert parse_steps("2, 1,2", 10) == [1, 2]
    assert parse_steps("0,9", 10) == [0, 9]
    for bad in ("10", "-1", "x"):
        with pytest.raises(ValueError, match="step|index"):
            parse_steps(bad, 10)
