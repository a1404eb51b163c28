"""DiffusionNFT pieces: optimality, implicit velocities, adaptive weight, loss, timesteps, EMA policy."""

from __future__ import annotations

import functools

import pytest
import torch
from mathcheck import assert_close

from solace.errors import ConfigError
from solace.nft.ema import EMAPolicy, ema_decay
from solace.nft.loss import (
    adaptive_weight,
    forward_noise,
    implicit_velocities,
    nft_loss,
    optimality,
    sample_training_timesteps,
    x0_from_velocity,
)
from solace.sampling.schedule import flow_match_sigmas

D64 = torch.float64


def _batch(seed=0, b=4, shape=(3, 5, 5)):
    """Random clean samples, noise, per-sample t, the noised x_t and a velocity near the target."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((b, *shape), generator=g, dtype=D64)
    eps = torch.randn((b, *shape), generator=g, dtype=D64)
    t = torch.rand(b, generator=g, dtype=D64) * 0.9 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = (eps - x0) + 0.3 * torch.randn((b, *shape), generator=g, dtype=D64)
    return x0, eps, t, x_t, v


def _fm_per_sample_grad(v, x_t, t, x0):
    """Per-sample FM loss ||x0(v) - x0||^2 / D (plain torch) and its gradient w.r.t. v."""
    v = v.detach().clone().requires_grad_(True)
    fm = ((x_t - t.view(-1, 1, 1, 1) * v - x0) ** 2).flatten(1).mean(1)
    (g,) = torch.autograd.grad(fm.sum(), v)
    return fm.detach(), g


def _grad(v, **kw):
    v = v.detach().clone().requires_grad_(True)
    loss, stats = nft_loss(v, **kw)
    (g,) = torch.autograd.grad(loss, v)
    return loss.detach(), g, stats


# ------------------------------------------------------------------------------------------ small pieces


def test_optimality_clips_by_hand():
    adv = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    assert_close(optimality(adv, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    assert_close(optimality(torch.tensor([1.0, -0.5]), 2.0), torch.tensor([0.75, 0.375]))
    with pytest.raises(ConfigError):
        optimality(adv, 0.0)


def test_implicit_velocities_by_hand():
    v, v_old = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    pos, neg = implicit_velocities(v, v_old, 0.5)
    assert_close(pos, torch.tensor([2.0, 0.5]))  # 0.5*1 + 0.5*3, 0.5*2 + 0.5*(-1)
    assert_close(neg, torch.tensor([4.0, -2.5]))  # 1.5*3 - 0.5*1, 1.5*(-1) - 0.5*2
    pos1, neg1 = implicit_velocities(v, v_old, 1.0)
    assert_close(pos1, v)
    assert_close(neg1, torch.tensor([5.0, -4.0]))  # 2 v_old - v: the reflection of v about v_old
    with pytest.raises(ConfigError):
        implicit_velocities(v, v_old, 0.0)


def test_forward_noise_and_x0_by_hand():
    x0, eps = torch.tensor([[2.0], [1.0]]), torch.tensor([[-1.0], [3.0]])
    x_t = forward_noise(x0, torch.tensor([0.25, 1.0]), eps)
    assert_close(x_t, torch.tensor([[1.25], [3.0]]))  # 0.75*2 - 0.25; pure noise at t = 1
    assert_close(forward_noise(x0, 0.5, eps), torch.tensor([[0.5], [2.0]]))
    # the exact velocity eps - x0 recovers x0
    assert_close(x0_from_velocity(x_t, torch.tensor([0.25, 1.0]), eps - x0), x0)


def test_adaptive_weight_by_hand():
    x0 = torch.zeros(2, 2, 2)
    pred = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    w = adaptive_weight(pred, x0, eps=1e-5)
    assert w.dtype == D64 and not w.requires_grad
    assert_close(w, torch.tensor([1.5, 1e-5], dtype=D64))  # mean |.| = 6/4, the zero error clamped to eps
    assert_close(adaptive_weight(pred, x0, eps=2.0), torch.tensor([2.0, 2.0], dtype=D64))


# --------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_on_policy_gradient_is_advantage_weighted_flow_matching(beta):
    x0, _, t, x_t, v = _batch()
    adv = torch.tensor([2.0, -1.0, 7.0, -3.0], dtype=D64)
    r = optimality(adv, 5.0)
    fm, g_fm = _fm_per_sample_grad(v, x_t, t, x0)
    b = v.shape[0]
    common = dict(v_old=v.clone(), x_t=x_t, t=t, x0=x0, adv=adv, beta=beta, adv_max=5.0)
    # adaptive=False: exactly (2r - 1) * grad FM per sample (/ B from the batch mean), times A_max if scaled
    _, g, _ = _grad(v, adaptive=False, scale_by_adv_max=False, **common)
    assert_close(g, ((2 * r - 1) / b).view(-1, 1, 1, 1) * g_fm, rtol=1e-10, atol=1e-12)
    _, g5, _ = _grad(v, adaptive=False, **common)
    # A_max (2r - 1) = clip(A): the released code's scaling gives clip(A) * grad FM
    assert_close(g5, (adv.clamp(-5, 5) / b).view(-1, 1, 1, 1) * g_fm, rtol=1e-10, atol=1e-12)
    # adaptive=True: the same direction per sample, scaled by 1 / w with w = mean |x0(v) - x0|
    _, ga, _ = _grad(v, adaptive=True, **common)
    w = (x_t - t.view(-1, 1, 1, 1) * v - x0).abs().flatten(1).mean(1)
    assert_close(ga, (adv.clamp(-5, 5) / (b * w)).view(-1, 1, 1, 1) * g_fm, rtol=1e-10, atol=1e-12)
    cos = torch.nn.functional.cosine_similarity(ga.flatten(1), g_fm.flatten(1), dim=1)
    assert_close(cos, torch.sign(2 * r - 1), rtol=0, atol=1e-12)


def test_v_old_is_a_constant():
    x0, _, t, x_t, v = _batch(seed=1)
    v_old = (v + 0.1).requires_grad_(True)
    vv = v.clone().requires_grad_(True)
    loss, _ = nft_loss(vv, v_old, x_t, t, x0, torch.ones(4, dtype=D64), beta=0.5)
    loss.backward()
    assert v_old.grad is None and vv.grad is not None and vv.grad.abs().sum() > 0


@pytest.mark.parametrize("adaptive", [False, True])
def test_full_optimality_is_flow_matching_on_the_positive_policy(adaptive):
    x0, _, t, x_t, v = _batch(seed=2)
    beta = 0.4
    adv = torch.full((4,), 5.0, dtype=D64)  # r = 1
    tt = t.view(-1, 1, 1, 1)
    # on policy: the loss is the FM loss / beta (/ w), the gradient exactly the FM gradient (/ w)
    fm, g_fm = _fm_per_sample_grad(v, x_t, t, x0)
    w = (x_t - tt * v - x0).abs().flatten(1).mean(1) if adaptive else torch.ones(4, dtype=D64)
    loss, g, stats = _grad(
        v, v_old=v.clone(), x_t=x_t, t=t, x0=x0, adv=adv, beta=beta, adaptive=adaptive, scale_by_adv_max=False
    )
    assert_close(loss, (fm / w).mean() / beta)
    assert_close(g, (1 / (4 * w)).view(-1, 1, 1, 1) * g_fm, rtol=1e-10, atol=1e-12)
    assert_close(stats["r_mean"], torch.tensor(1.0, dtype=D64))
    assert_close(stats["fm"], fm.mean())
    # off policy: FM on v+ = beta v + (1 - beta) v_old, i.e. ||x_t - t v+ - x0||^2 / D / beta
    v_old = v + 0.2
    v_pos = beta * v + (1 - beta) * v_old
    err = x_t - tt * v_pos - x0
    w = err.abs().flatten(1).mean(1) if adaptive else torch.ones(4, dtype=D64)
    loss, g, _ = _grad(v, v_old=v_old, x_t=x_t, t=t, x0=x0, adv=adv, beta=beta, adaptive=adaptive)
    assert_close(loss, 5.0 * ((err**2).flatten(1).mean(1) / w).mean() / beta)
    d = err[0].numel()
    assert_close(g, 5.0 * (-2 * tt * err / (d * 4 * w.view(-1, 1, 1, 1))), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_advantage_gives_zero_gradient_on_policy(adaptive):
    x0, _, t, x_t, v = _batch(seed=3)
    adv = torch.tensor([0.0, 0.0, 3.0, 0.0], dtype=D64)
    loss, g, stats = _grad(v, v_old=v.clone(), x_t=x_t, t=t, x0=x0, adv=adv, beta=0.7, adaptive=adaptive)
    assert g[[0, 1, 3]].abs().max() < 1e-12
    assert g[2].abs().max() > 1e-7  # the A = 3 sample does move
    assert_close(stats["r_mean"], torch.tensor((0.5 * 3 + 0.8) / 4, dtype=D64))
    # all-zero advantages: zero gradient everywhere
    _, g0, _ = _grad(v, v_old=v.clone(), x_t=x_t, t=t, x0=x0, adv=torch.zeros(4, dtype=D64), beta=0.7)
    assert g0.abs().max() < 1e-12


def test_loss_matches_a_from_scratch_reference():
    x0, _, t, x_t, v = _batch(seed=4, b=5, shape=(2, 4, 3))
    g = torch.Generator().manual_seed(9)
    v_old = v + 0.25 * torch.randn(v.shape, generator=g, dtype=D64)
    adv = torch.randn(5, generator=g, dtype=D64) * 3
    beta, a_max = 0.6, 2.0
    vv = v.clone().requires_grad_(True)
    loss, stats = nft_loss(vv, v_old, x_t, t, x0, adv, beta=beta, adv_max=a_max, adaptive=True, eps=1e-5)
    (grad,) = torch.autograd.grad(loss, vv)

    # reference, written out with plain torch ops
    ref_v = v.clone().requires_grad_(True)
    r = torch.clamp(torch.clamp(adv, -a_max, a_max) / a_max / 2 + 0.5, 0, 1)
    tt = t[:, None, None, None]
    xp = x_t - tt * (beta * ref_v + (1 - beta) * v_old)
    xn = x_t - tt * ((1 + beta) * v_old - beta * ref_v)
    wp = (xp.detach() - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
    wn = (xn.detach() - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
    lp = ((xp - x0) ** 2 / wp).mean(dim=(1, 2, 3))
    ln = ((xn - x0) ** 2 / wn).mean(dim=(1, 2, 3))
    ref = ((r * lp / beta + (1 - r) * ln / beta) * a_max).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_v)

    assert abs(loss.item() - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))
    assert (grad - ref_grad).abs().max().item() < 1e-6
    assert_close(stats["r_mean"], r.mean())
    assert_close(stats["positive"], lp.detach().mean())
    assert_close(stats["negative"], ln.detach().mean())
    assert_close(stats["old_deviation"], ((v - v_old) ** 2).mean())


def test_loss_float32_and_shape_errors():
    x0, _, t, x_t, v = (x.float() for x in _batch(seed=5))
    loss, stats = nft_loss(v, v.clone(), x_t, t, x0, torch.zeros(4), beta=1.0)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ConfigError) as exc:
        nft_loss(v, v, x_t, t, x0, torch.zeros(3))
    assert exc.value.field == "adv"
    with pytest.raises(ConfigError) as exc:
        nft_loss(v, v, x_t, t[:2], x0, torch.zeros(4))
    assert exc.value.field == "t"
    with pytest.raises(ConfigError):
        nft_loss(v, v, x_t[:, :1], t, x0, torch.zeros(4))


# ------------------------------------------------------------------------------------------- timesteps


def test_uniform_timesteps_range_shift_and_determinism():
    def draw(seed, **kw):
        return sample_training_timesteps(2000, "uniform", torch.Generator().manual_seed(seed), **kw)

    u = draw(0, t_min=0.2, t_max=0.8)
    assert u.shape == (2000,) and u.dtype == torch.float32
    assert u.min() >= 0.2 and u.max() < 0.8
    assert abs(u.mean().item() - 0.5) < 0.02
    s = draw(0, t_min=0.2, t_max=0.8, shift=3.0)
    assert_close(s, 3 * u / (1 + 2 * u))  # the same draws through t' = s t / (1 + (s - 1) t)
    assert s.min() >= 3 * 0.2 / 1.4 and s.max() < 3 * 0.8 / 2.6
    assert torch.equal(draw(0, shift=3.0), draw(0, shift=3.0))
    assert not torch.equal(draw(0), draw(1))
    k = sample_training_timesteps(5, "uniform", torch.Generator().manual_seed(0), per_sample=3)
    assert k.shape == (5, 3)
    with pytest.raises(ConfigError):
        draw(0, t_min=0.5, t_max=0.5)
    with pytest.raises(ConfigError):
        draw(0, shift=0.0)


def test_grid_timesteps_are_the_sampler_sigmas():
    sigmas = flow_match_sigmas(10, shift=3.0)  # 11 entries, trailing 0
    g = torch.Generator().manual_seed(0)
    t = sample_training_timesteps(3000, "grid", g, sigmas=sigmas)
    assert t.shape == (3000,) and t.dtype == sigmas.dtype
    assert (t > 0).all()
    assert set(t.tolist()) == set(sigmas[:-1].tolist())  # every nonzero sigma, nothing else
    again = sample_training_timesteps(3000, "grid", torch.Generator().manual_seed(0), sigmas=sigmas)
    assert torch.equal(t, again)
    # per sample, distinct grid points (the released code trains each sample on 9 of the 10)
    k = sample_training_timesteps(6, "grid", torch.Generator().manual_seed(1), sigmas=sigmas, per_sample=9)
    assert k.shape == (6, 9)
    for row in k:
        assert len(set(row.tolist())) == 9 and set(row.tolist()) <= set(sigmas[:-1].tolist())
    with pytest.raises(ConfigError):
        sample_training_timesteps(2, "grid", g, sigmas=sigmas, per_sample=11)
    with pytest.raises(ConfigError):
        sample_training_timesteps(2, "grid", g)
    with pytest.raises(ConfigError):
        sample_training_timesteps(2, "cosine", g)


# ------------------------------------------------------------------------------------------------- EMA


def test_ema_decay_schedules():
    assert ema_decay(123, "constant", decay=0.3) == 0.3
    # released decay_type=1: min(0.001 * step, 0.5)
    assert ema_decay(0) == 0.0
    assert ema_decay(100) == pytest.approx(0.1)
    assert ema_decay(500) == pytest.approx(0.5) and ema_decay(5000) == 0.5
    # released decay_type=2: 0 before step 75, then min(0.0075 * (step - 75), 0.999)
    t2 = functools.partial(ema_decay, kind="ramp", rate=0.0075, max_decay=0.999, delay=75)
    assert t2(74) == 0.0 and t2(75) == 0.0
    assert t2(175) == pytest.approx(0.75)
    assert t2(300) == 0.999
    with pytest.raises(ConfigError):
        ema_decay(0, "cosine")
    with pytest.raises(ConfigError):
        ema_decay(0, "constant", decay=1.5)


def _params():
    return [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[4.0]]))]


def test_ema_decay_zero_copies_and_decay_by_hand():
    params = _params()
    ema = EMAPolicy(params, decay_schedule=0.0)
    with torch.no_grad():
        params[0].copy_(torch.tensor([3.0, 6.0]))
        params[1].copy_(torch.tensor([[0.0]]))
    assert torch.equal(ema.old[0], torch.tensor([1.0, 2.0]))  # a copy, not a view of the params
    assert ema.update(step=7) == 0.0
    assert torch.equal(ema.old[0], params[0].detach()) and torch.equal(ema.old[1], params[1].detach())

    params = _params()
    ema = EMAPolicy(params, decay_schedule=functools.partial(ema_decay, kind="constant", decay=0.25))
    with torch.no_grad():
        params[0].copy_(torch.tensor([3.0, 6.0]))
        params[1].copy_(torch.tensor([[0.0]]))
    assert ema.update(0) == 0.25
    assert_close(ema.old[0], torch.tensor([2.5, 5.0]))  # 0.25 * [1, 2] + 0.75 * [3, 6]
    assert_close(ema.old[1], torch.tensor([[1.0]]))  # 0.25 * 4 + 0.75 * 0
    # the ramp schedule is called with the step
    ema = EMAPolicy(_params(), decay_schedule=ema_decay)
    assert ema.update(200) == pytest.approx(0.2)


def test_ema_swap_restores_trained_weights_exactly():
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(3, 4, generator=g)),
        torch.nn.Parameter(torch.randn(5, generator=g)),
    ]
    ema = EMAPolicy(params, decay_schedule=0.0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) / 3)
    trained = [p.detach().clone() for p in params]
    with ema.swapped():
        assert ema.is_swapped
        assert all(torch.equal(p, o) for p, o in zip(params, ema.old, strict=True))
        out = (params[0].sum() * 2).requires_grad  # params stay trainable leaves
        with pytest.raises(RuntimeError):
            ema.update(0)
    assert out and not ema.is_swapped
    assert all(torch.equal(p, k) for p, k in zip(params, trained, strict=True))
    with pytest.raises(ValueError), ema.swapped():  # restored on errors too
        raise ValueError("boom")
    assert all(torch.equal(p, k) for p, k in zip(params, trained, strict=True))
    with pytest.raises(RuntimeError):
        ema.swap_out()


def test_ema_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    params = _params()
    ema = EMAPolicy(params, decay_schedule=0.5)
    with torch.no_grad():
        params[0].add_(2.0)
    ema.update(0)
    sd = ema.state_dict()
    assert sorted(sd) == ["old.0", "old.1"]
    save_file(sd, str(tmp_path / "old.safetensors"))
    other = EMAPolicy(_params(), decay_schedule=0.0)
    other.load_state_dict(load_file(str(tmp_path / "old.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(other.old, ema.old, strict=True))
    assert_close(other.old[0], torch.tensor([2.0, 3.0]))
    sd["old.0"].add_(1.0)  # the state dict holds copies
    assert_close(ema.old[0], torch.tensor([2.0, 3.0]))
    with pytest.raises(ConfigError):
        other.load_state_dict({"old.0": sd["old.0"]})
    with pytest.raises(ConfigError):
        other.load_state_dict({"old.0": torch.zeros(3), "old.1": sd["old.1"]})
