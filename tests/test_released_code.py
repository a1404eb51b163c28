"""The released-code switches (issue 30), each against expectations worked out by hand from the authors'
released scripts (wookiekim/SOLACE ``scripts/train_sd3_self.py``, ``scripts/train_flux_self_accelerate.py``,
``config/solace.py``) and Flow-GRPO's (yifan123/flow_grpo ``scripts/train_sd3.py``): probed and trained
steps, advantage std, the standardisation's scope, the LoRA EMA, independent probes, the detached
unconditional branch, the zero-advantage filter, and the presets that set them."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
import torch
from mathcheck import assert_close

from solace.errors import ConfigError
from solace.grpo.advantages import drop_zero_advantages
from solace.grpo.window import parse_steps, released_steps, train_window
from solace.models.base import AdapterBase, Conditioning
from solace.nft.ema import EMAPolicy, ema_decay
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer, probe_steps
from solace.rewards.self_confidence import (
    aggregate,
    draw_probes,
    probe_mse,
    standardization_batches,
    standardize_per_timestep,
)
from solace.sampling.sampler import cfg_velocity
from solace.trainer.config import load_config
from solace.trainer.guard import group_advantages_masked

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from trainer_helpers import make_tiny_toy_weights, tiny_overrides  # noqa: E402

# ------------------------------------------------------------------------------- 1, 2: steps and window

# By hand. T' = int(0.99 T): 9, 19, 39 (the reward's extra cap at T - 1 changes nothing here).
# released_sd3: int(0.5 T') .. T' - 1 = 4..8, 9..18, 19..38; released_flux: int(0.6 T') .. T' - 1 with
# int(5.4) = 5, int(11.4) = 11, int(23.4) = 23. later_half / rho 0.5: the last T / 2 steps; rho 0.6: the
# last ceil(0.6 T) steps (6, 12, 24); all: every step.
STEPS = {
    10: {
        "all": list(range(10)),
        "later_half": [5, 6, 7, 8, 9],
        "released_sd3": [4, 5, 6, 7, 8],
        "released_flux": [5, 6, 7, 8],
        "rho0.6": [4, 5, 6, 7, 8, 9],
        "rho0.5": [5, 6, 7, 8, 9],
    },
    20: {
        "all": list(range(20)),
        "later_half": list(range(10, 20)),
        "released_sd3": list(range(9, 19)),
        "released_flux": list(range(11, 19)),
        "rho0.6": list(range(8, 20)),
        "rho0.5": list(range(10, 20)),
    },
    40: {
        "all": list(range(40)),
        "later_half": list(range(20, 40)),
        "released_sd3": list(range(19, 39)),
        "released_flux": list(range(23, 39)),
        "rho0.6": list(range(16, 40)),
        "rho0.5": list(range(20, 40)),
    },
}


@pytest.mark.parametrize("num_steps", [10, 20, 40])
def test_probed_steps_and_trained_window_by_hand(num_steps):
    want = STEPS[num_steps]
    for spec in ("all", "later_half", "released_sd3", "released_flux"):
        assert probe_steps(spec, num_steps) == want[spec], spec
    assert train_window(num_steps, 0.6) == want["rho0.6"]  # the paper's window
    assert train_window(num_steps, 0.5) == want["rho0.5"]  # the project's old "released" window
    assert parse_steps("released_sd3", num_steps) == want["released_sd3"]  # grpo.train_steps
    assert parse_steps("released_flux", num_steps) == want["released_flux"]
    # the off-by-one the issue names: the project's half drops the released first step, adds the last
    assert want["later_half"] != want["released_sd3"]
    assert want["released_sd3"][0] == want["later_half"][0] - 1
    assert num_steps - 1 in want["later_half"] and num_steps - 1 not in want["released_sd3"]


def test_released_steps_at_the_released_flux_schedule_and_too_few_steps():
    assert released_steps(6, 0.6) == [3, 4]  # FLUX's 6 sampler steps: T' = 5, int(3.0) = 3
    assert released_steps(6, 0.5) == [2, 3, 4]
    assert released_steps(1, 0.5) == []
    with pytest.raises(ConfigError) as e:
        probe_steps("released_sd3", 1)
    assert e.value.field == "reward.self_confidence.timesteps"
    with pytest.raises(ValueError, match="released_flux names no step"):
        parse_steps("released_flux", 1)


def test_the_trainer_trains_and_probes_the_released_steps(weights, tmp_path):
    from solace.trainer.trainer import Trainer

    over = {
        "sampling.num_steps": 10,
        "reward.self_confidence.timesteps": "released_sd3",
        "grpo.train_steps": "released_sd3",
    }
    tr = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "r", **over)))
    probe_idx, probe_t = tr.scoring.rewards.components["self_confidence"].timesteps(tr.ctx.sigmas)
    assert tr.ctx.window == [4, 5, 6, 7, 8] and probe_idx == [4, 5, 6, 7, 8]
    assert_close(probe_t, tr.ctx.sigmas[4:9])


# ------------------------------------------------------------------------------------ 3: advantage std


def test_global_and_group_std_on_a_hand_made_batch():
    r = torch.tensor([0.0, 2.0, 4.0, 1.0, 1.0, 7.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    # group means 2 and 3; population stds sqrt(8/3) and sqrt(8); the batch: mean 2.5, variance 33.5 / 6
    centred = torch.tensor([-2.0, 0.0, 2.0, -2.0, -2.0, 4.0], dtype=torch.float64)
    group = centred / torch.tensor([math.sqrt(8 / 3)] * 3 + [math.sqrt(8)] * 3, dtype=torch.float64)
    whole = centred / math.sqrt(33.5 / 6)
    got_group = group_advantages_masked(r, ids, eps=0.0)
    got_global = group_advantages_masked(r, ids, global_std=True, eps=0.0)
    assert_close(got_group, group)
    assert_close(got_global, whole)
    assert not torch.allclose(got_group, got_global)  # the switch matters on this batch
    # Flow-GRPO's tracker adds 1e-4 to the std (PerPromptStatTracker); so does grpo.adv_eps
    assert_close(group_advantages_masked(r, ids, global_std=True), centred / (math.sqrt(33.5 / 6) + 1e-4))


# ----------------------------------------------------------------------- 4: the standardisation's scope


def test_per_batch_standardisation_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0], [10.0, 4.0]], dtype=torch.float64)
    # batch 0 = rows 0, 1: column means 2, 4, population stds 1, 2 -> z = -1, +1 in both columns;
    # batch 1 = rows 2, 3: column 0 is flat (z = 0), column 1 mean 2, std 2 -> -1, +1
    e = 1e-6
    want = torch.tensor(
        [[-1 / (1 + e), -2 / (2 + e)], [1 / (1 + e), 2 / (2 + e)], [0.0, -2 / (2 + e)], [0.0, 2 / (2 + e)]],
        dtype=torch.float64,
    )
    ids = torch.tensor([0, 0, 1, 1])
    assert_close(standardize_per_timestep(s, batch_ids=ids), want)
    # the same rows standardised over the whole matrix are not the per-batch values
    assert not torch.allclose(standardize_per_timestep(s), want)
    # R = sum_t w z / sum_t w with t(1-t) weights at t = 0.5, 0.25: w = 0.25, 0.1875
    ts = torch.tensor([0.5, 0.25])
    w = torch.tensor([0.25, 0.1875], dtype=torch.float64)
    r = aggregate(s, ts, "t(1-t)", standardize=True, batch_ids=ids)
    assert_close(r, (want * w).sum(1) / w.sum())
    # batch ids in any order: a batch is its rows, wherever they are
    perm = torch.tensor([2, 0, 3, 1])
    assert_close(standardize_per_timestep(s[perm], batch_ids=ids[perm]), want[perm])
    with pytest.raises(ConfigError):
        standardize_per_timestep(s, batch_ids=torch.tensor([0, 1]))


def test_standardisation_batches_consecutive_and_dealt():
    assert standardization_batches(8, 2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert standardization_batches(8, 4, group_size=4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # dealt: each run of 2 groups x 4 samples is shuffled, then cut into batches of 2
    gen = functools.partial(lambda s: torch.Generator().manual_seed(s))
    ids = standardization_batches(16, 2, group_size=4, shuffle_groups=2, generator=gen(5))
    g = gen(5)
    for run in range(2):  # the permutations the generator draws, one per run, in order
        perm = torch.randperm(8, generator=g)
        for k in range(8):
            assert ids[run * 8 + perm[k]] == run * 4 + k // 2
    assert sorted(torch.bincount(ids).tolist()) == [2] * 8  # every batch holds 2 samples ...
    assert all(set(ids[r * 8 : (r + 1) * 8].tolist()) == set(range(r * 4, r * 4 + 4)) for r in range(2))
    # ... and the shuffle mixes prompt groups: some batch holds samples of both groups of its run
    assert any(len({int(i) // 4 for i in (ids == b).nonzero().flatten()}) == 2 for b in range(8))
    assert not torch.equal(ids, standardization_batches(16, 2, 4, 2, gen(6)))  # a seed of its own
    # an iteration of fewer groups than a run is one run: 1 group of 4 dealt into 2 batches
    one = standardization_batches(4, 2, group_size=4, shuffle_groups=2, generator=gen(5))
    assert sorted(torch.bincount(one).tolist()) == [2, 2]
    with pytest.raises(ConfigError) as e:
        standardization_batches(16, 3)
    assert e.value.field == "standardize_batch"
    with pytest.raises(ConfigError) as e:
        standardization_batches(16, 2, group_size=4, shuffle_groups=3)
    assert e.value.field == "standardize_shuffle_groups"


# --------------------------------------------------------------------------------------------- 5: EMA


def test_warmup_decay_and_its_interval():
    # d = min((1 + s) / (10 + s), 0.9), moved only when (s + 1) % every == 0
    assert ema_decay(1, "warmup", max_decay=0.9) == pytest.approx(2 / 11)
    assert ema_decay(7, "warmup", max_decay=0.9, every=8) == pytest.approx(8 / 17)
    assert ema_decay(100, "warmup", max_decay=0.9) == 0.9  # 101 / 110 > 0.9
    assert [ema_decay(s, "warmup", max_decay=0.9, every=8) for s in range(1, 7)] == [1.0] * 6
    assert ema_decay(15, "warmup", max_decay=0.9, every=8) == pytest.approx(16 / 25)
    with pytest.raises(ConfigError):
        ema_decay(1, "warmup", every=0)


def test_ema_after_three_steps_by_hand():
    p = torch.nn.Parameter(torch.tensor([0.0, 11.0]))
    sched = functools.partial(ema_decay, kind="warmup", max_decay=0.9, every=1)
    ema = EMAPolicy([p], sched)
    seen = []
    for s, value in enumerate(([22.0, 0.0], [12.0, 24.0], [13.0, 0.0]), start=1):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        seen.append(ema.update(s))
    # d1 = 2/11, d2 = 3/12, d3 = 4/13:
    # e1 = 2/11 [0, 11] + 9/11 [22, 0]  = [18, 2]
    # e2 = 1/4 [18, 2]  + 3/4 [12, 24]  = [13.5, 18.5]
    # e3 = 4/13 [13.5, 18.5] + 9/13 [13, 0] = [(54 + 117) / 13, 74 / 13]
    assert seen == pytest.approx([2 / 11, 3 / 12, 4 / 13])
    assert_close(ema.old[0], torch.tensor([171 / 13, 74 / 13]))
    # the released interval of 8: three steps leave the average where it started
    ema8 = EMAPolicy([p], functools.partial(ema_decay, kind="warmup", max_decay=0.9, every=8))
    start = p.detach().clone()
    for s in (1, 2, 3):
        with torch.no_grad():
            p.add_(1.0)
        assert ema8.update(s) == 1.0
    assert torch.equal(ema8.old[0], start)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


EMA_RUN = {"lora_ema.enabled": True, "lora_ema.every": 1, "train.iterations": 3}


def test_trainer_ema_is_evaluated_and_exported_and_is_the_hand_average(weights, tmp_path):
    """Three iterations of one optimizer step: the EMA is the hand average of the weights after each step,
    evaluations see it, OUT/lora holds it and OUT/lora_trained the trained weights."""
    from solace.models.lora import lora_state_dict, read_lora
    from solace.trainer.trainer import Trainer

    tr = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "run", **EMA_RUN)))
    p0 = [p.detach().clone() for p in tr.params]
    after = []
    move = tr.updater.after_step
    tr.updater.after_step = lambda s: (after.append([p.detach().clone() for p in tr.params]), move(s))
    tr.train()
    assert len(after) == 3
    hand = p0
    for s, ps in enumerate(after, start=1):
        d = min((1 + s) / (10 + s), 0.9)
        hand = [d * e + (1 - d) * x for e, x in zip(hand, ps, strict=True)]
    for got, want in zip(tr.lora_ema.old, hand, strict=True):
        assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(e, x) for e, x in zip(tr.lora_ema.old, after[-1], strict=True))
    trained = lora_state_dict(tr.adapter.denoiser)
    with tr.lora_ema.swapped():
        averaged = {k: v.clone() for k, v in lora_state_dict(tr.adapter.denoiser).items()}
    exported, _ = read_lora(tmp_path / "run" / "lora")
    exported_trained, _ = read_lora(tmp_path / "run" / "lora_trained")
    assert exported.keys() == averaged.keys() == exported_trained.keys()
    assert all(torch.equal(exported[k], averaged[k]) for k in exported)
    assert all(torch.equal(exported_trained[k], trained[k]) for k in exported)
    # an evaluation runs on the EMA, and the trained weights come back afterwards
    seen = {}

    class Probe:
        def evaluate(self, iteration):
            seen["lora"] = {k: v.clone() for k, v in lora_state_dict(tr.adapter.denoiser).items()}
            return {"iteration": iteration}

        def scalars(self, out):
            return {}

    tr.evaluator, tr.cfg.monitor.enabled = Probe(), False
    tr.evaluate(3)
    assert all(torch.equal(seen["lora"][k], averaged[k]) for k in averaged)
    assert all(torch.equal(v, trained[k]) for k, v in lora_state_dict(tr.adapter.denoiser).items())


def test_trainer_ema_is_kept_in_checkpoints_and_resumed_bitwise(weights, tmp_path):
    from safetensors.torch import load_file

    from solace.trainer.trainer import Trainer

    over = {"lora_ema.enabled": True, "lora_ema.every": 2, "train.iterations": 4}  # moves at steps 1, 3
    full = tmp_path / "full"
    Trainer(load_config("toy", tiny_overrides(weights, full, **over))).train()
    part = tmp_path / "part"
    Trainer(load_config("toy", tiny_overrides(weights, part, **{**over, "train.iterations": 2}))).train()
    Trainer(load_config("toy", tiny_overrides(weights, part, **over))).train(resume=True)
    for name in ("lora", "lora_trained"):
        a = load_file(str(full / name / "pytorch_lora_weights.safetensors"))
        b = load_file(str(part / name / "pytorch_lora_weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ua = load_file(str(full / "checkpoints" / "iter_000004" / "update.safetensors"))
    ub = load_file(str(part / "checkpoints" / "iter_000004" / "update.safetensors"))
    assert ua.keys() == ub.keys() and all(k.startswith("lora_ema.old.") for k in ua)
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    # the check has teeth: the average is not the trained weights
    a = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors"))
    t = load_file(str(full / "lora_trained" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(a[k], t[k]) for k in a)


# ------------------------------------------------------------------------ 7: independent probes, FLUX


def _const_t_field(zt, t, idx):
    return t.reshape(-1, *([1] * (zt.ndim - 1))).to(zt.dtype).expand_as(zt)


def test_independent_k4_probes_by_hand():
    lat, B, ts = (2, 3), 2, [0.8, 0.3]
    probes = draw_probes(
        4, lat, B, 2, "per_sample_timestep", torch.Generator().manual_seed(3), antithetic=False
    )
    # exactly the released FLUX script's kind of draw: K plain Gaussians per sample and timestep
    assert torch.equal(probes, torch.randn((B, 2, 4, *lat), generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(probes[:, :, 2:], -probes[:, :, :2])  # no antithetic pairs
    anti = draw_probes(4, lat, B, 2, "per_sample_timestep", torch.Generator().manual_seed(3))
    assert torch.equal(anti[:, :, 2:], -anti[:, :, :2])
    # with v = t: eps_hat = z0 + t, MSE[b, j] = 1/4 sum_k mean((z0[b] + t_j - eps[b, j, k])^2)
    z0 = torch.tensor([[[0.5, -1.0, 0.0], [2.0, 0.0, 1.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    want = torch.empty(B, 2)
    for b in range(B):
        for j, t in enumerate(ts):
            want[b, j] = sum(((z0[b] + t - probes[b, j, k]) ** 2).mean() for k in range(4)) / 4
    assert_close(probe_mse(_const_t_field, z0, ts, probes, antithetic=False), want)
    with pytest.raises(ConfigError):  # K odd: fine unpaired, refused when the probes must pair
        probe_mse(_const_t_field, z0, ts, probes[:, :, :3], antithetic=True)
    assert probe_mse(_const_t_field, z0, ts, probes[:, :, :3], antithetic=False).shape == (B, 2)


class _GuidedAdapter(AdapterBase):
    """A FLUX-like adapter: v = guidance_scale everywhere, so the probes' MSE shows the guidance used."""

    name, dtype, guidance_scale = "flux", torch.float32, 3.5
    denoiser = torch.nn.Linear(1, 1)

    def velocity(self, z, t, cond):
        return torch.full_like(z, self.guidance_scale)


def test_scorer_draws_independent_probes_and_probes_with_its_own_guidance():
    ad, z0 = _GuidedAdapter(), torch.zeros(2, 3)
    cond = Conditioning({"e": torch.zeros(2, 1)})
    ts = torch.tensor([0.5])
    cfg = SelfConfidenceCfg(num_probes=4, antithetic=False, probe_guidance=1.0, delta=1e-6)
    s = SelfConfidenceScorer(cfg).scores(ad, z0, cond, None, ts, torch.zeros(2, dtype=torch.long), [7])
    probes = draw_probes(4, (3,), 2, 1, "group", torch.Generator().manual_seed(7), antithetic=False)
    # with z0 = 0: eps_hat = v = 1.0 (the probes' guidance), MSE = mean_k mean((1 - eps_k)^2)
    want = -torch.log(((1.0 - probes) ** 2).mean((1,)).mean() + 1e-6)
    assert_close(s, want.expand(2, 1))
    assert ad.guidance_scale == 3.5  # restored
    own = SelfConfidenceCfg(num_probes=4, antithetic=False, delta=1e-6)
    s35 = SelfConfidenceScorer(own).scores(ad, z0, cond, None, ts, torch.zeros(2, dtype=torch.long), [7])
    assert_close(s35, (-torch.log(((3.5 - probes) ** 2).mean((1,)).mean() + 1e-6)).expand(2, 1))


# --------------------------------------------------------------------------- 8: the unconditional branch


class _LinearAdapter(AdapterBase):
    """v(z, t, c) = a z + e_c: dv/da = z for either branch, so CFG's gradient in a is (1 - s) z + s z = z,
    and with the unconditional branch detached s z."""

    dtype = torch.float32

    def __init__(self):
        self.a = torch.nn.Parameter(torch.tensor(0.3))

    def velocity(self, z, t, cond):
        return self.a * z + cond.tensors["e"]


@pytest.mark.parametrize("s", [7.0, 4.5])
def test_detached_unconditional_branch_by_hand(s):
    z = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    cond, null = Conditioning({"e": torch.ones(2, 2)}), Conditioning({"e": torch.zeros(2, 2)})
    t = torch.full((2,), 0.5)
    grads, values = [], []
    for detach in (False, True):
        ad = _LinearAdapter()
        v = cfg_velocity(ad, z, t, cond, null, s, detach_uncond=detach)
        loss = (v**2).sum()
        loss.backward()
        grads.append(ad.a.grad.item())
        values.append(loss.detach())
    # the value is the same; dL/da = sum 2 v dv/da, dv/da = z (kept) or s z (detached)
    assert torch.equal(values[0], values[1])
    v = 0.3 * z + s * 1.0
    assert grads[0] == pytest.approx(float((2 * v * z).sum()), rel=1e-6)
    assert grads[1] == pytest.approx(float((2 * v * s * z).sum()), rel=1e-6)
    assert grads[1] == pytest.approx(s * grads[0], rel=1e-6)


def test_detach_switch_in_the_training_loss_changes_the_gradient_not_the_loss(weights, tmp_path):
    from solace.trainer.trainer import Trainer

    tr = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "d")))
    ro = tr.collect(0)
    batch = tr.updater.micro_batch(ro, torch.arange(len(ro)), 0, 0)
    out = []
    for detach in (False, True):
        tr.cfg.grpo.detach_uncond = detach
        tr.ctx.optimizer.zero_grad(set_to_none=True)
        loss, _ = tr.updater.loss(batch, 0)
        loss.backward()
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in tr.params])))
    assert torch.equal(out[0][0], out[1][0])
    assert not torch.allclose(out[0][1], out[1][1], rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- 9: zero advantages


def test_drop_zero_advantages_by_hand():
    adv = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.5, -0.5, 0.0, 0.0])
    keep, n = drop_zero_advantages(adv, None, num_processes=2, min_per_process=1)
    assert keep.tolist() == [False, True, True, False, True, True, False, False] and n == 4
    # a sample already dropped (a non-finite reward) stays dropped and is not counted again
    prior = torch.tensor([False, True, True, True, True, True, True, True])
    keep, n = drop_zero_advantages(adv, prior, num_processes=2, min_per_process=1)
    assert keep.tolist() == [False, True, True, False, True, True, False, False] and n == 3
    # a process left with fewer samples than optimizer steps: nothing dropped
    assert drop_zero_advantages(adv, prior, num_processes=2, min_per_process=3) == (prior, 0)
    assert drop_zero_advantages(torch.ones(4), None) == (None, 0)


@pytest.mark.parametrize("drop", [False, True])
def test_zero_advantage_samples_leave_the_update(weights, tmp_path, drop):
    from solace.trainer.trainer import Trainer

    over = {"grpo.drop_zero_advantages": drop, "train.micro_batch_size": 1}
    tr = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "z", **over)))
    ro = tr.sample_rollout(0)
    total = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 3.0])  # group 0 flat: advantages exactly 0
    adv, _, dropped, n_zero = tr.scoring.advantages(ro, total)
    assert dropped == 0 and adv[:4].eq(0).all() and adv[4:].ne(0).all()
    trained = []
    micro = tr.updater.micro_batch
    tr.updater.micro_batch = lambda r, mb, *a: (trained.extend(mb.tolist()), micro(r, mb, *a))[1]
    tr.update(ro, 0)
    assert sorted(trained) == ([4, 5, 6, 7] if drop else list(range(8)))
    assert n_zero == (4 if drop else 0)


# -------------------------------------------------------------------------------------- config, presets


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("reward.self_confidence.standardize_batch=-1", "reward.self_confidence.standardize_batch"),
        ("reward.self_confidence.standardize_batch=8", "reward.self_confidence.standardize_batch"),
        (
            "reward.self_confidence.standardize_shuffle_groups=2",
            "reward.self_confidence.standardize_shuffle_groups",
        ),
        ("reward.self_confidence.probe_guidance=1.0", "reward.self_confidence.probe_guidance"),
        ("reward.self_confidence.num_probes=3", "reward.self_confidence.num_probes"),
        ("grpo.train_steps=released_lol", "grpo.train_steps"),
        ("lora_ema.max_decay=1.5", "lora_ema.max_decay"),
        ("lora_ema.every=0", "lora_ema.every"),
    ],
)
def test_new_fields_are_checked_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("toy", [override], check_paths=False)
    assert str(e.value).startswith(f"{field}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["reward.self_confidence.standardize_batch=5"], "reward.self_confidence.standardize_batch"),
        (["sampling.prompts_per_step=3"], "reward.self_confidence.standardize_shuffle_groups"),
        (["sampling.num_steps=1"], "reward.self_confidence.timesteps"),
        (["train.algorithm=nft", "sampling.noise_level=0"], "grpo.drop_zero_advantages"),
    ],
)
def test_released_preset_rejects_what_does_not_fit(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config("toy_released_code", overrides, check_paths=False)
    assert str(e.value).startswith(f"{field}: ")
    load_config(
        "toy_released_code",
        ["reward.self_confidence.num_probes=3", "reward.self_confidence.antithetic=false"],
    )


def test_the_cli_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from solace.cli.main import app

    res = CliRunner().invoke(app, ["config", "check", "toy", "reward.self_confidence.standardize_batch=-1"])
    assert res.exit_code == 2
    assert "reward.self_confidence.standardize_batch" in res.output


def test_released_presets_carry_the_released_settings():
    paper = load_config("toy", check_paths=False)
    toy = load_config("toy_released_code", check_paths=False)
    sd = load_config("sd35m_released_code", check_paths=False)
    flux = load_config("flux_released_code", check_paths=False)
    assert (paper.grpo.global_std, paper.lora_ema.enabled, paper.grpo.train_steps) == (False, False, "")
    assert paper.reward.self_confidence.standardize_batch == 0 and paper.reward.self_confidence.antithetic
    for cfg, steps in ((toy, "released_sd3"), (sd, "released_sd3"), (flux, "released_flux")):
        sc = cfg.reward.self_confidence
        assert (sc.timesteps, cfg.grpo.train_steps) == (steps, steps)
        assert sc.standardize and sc.weighting == "t(1-t)" and sc.probe_mode == "per_sample_timestep"
        assert sc.delta == 1e-6 and cfg.grpo.global_std and not cfg.grpo.detach_uncond
        assert (cfg.lora_ema.enabled, cfg.lora_ema.max_decay, cfg.lora_ema.every) == (True, 0.9, 8)
        assert cfg.train.updates_per_iteration == 1
    # one process's sampling batch, dealt from a shuffled round of prompts (8 GPUs x batch / 16 prompts)
    assert (
        toy.reward.self_confidence.standardize_batch,
        toy.reward.self_confidence.standardize_shuffle_groups,
    ) == (8, 2)
    sds = sd.reward.self_confidence
    assert (sds.standardize_batch, sds.standardize_shuffle_groups, sds.num_probes, sds.antithetic) == (
        8,
        4,
        8,
        True,
    )
    assert (sd.sampling.prompts_per_step, sd.sampling.group_size, sd.sampling.batch_size) == (16, 16, 8)
    assert sd.model.max_sequence_length == 128 and "attn.to_q" in sd.model.lora.target_modules
    assert (
        toy.grpo.drop_zero_advantages and sd.grpo.drop_zero_advantages and not flux.grpo.drop_zero_advantages
    )
    fs = flux.reward.self_confidence
    assert (
        fs.num_probes,
        fs.antithetic,
        fs.probe_guidance,
        fs.standardize_batch,
        fs.standardize_shuffle_groups,
    ) == (
        4,
        False,
        1.0,
        4,
        2,
    )
    assert (flux.sampling.num_steps, flux.eval.num_steps, flux.sampling.cfg_scale) == (6, 28, 1.0)
    assert (flux.model.lora.rank, flux.model.lora.alpha) == (
        64,
        128,
    ) and "ff.net.2" in flux.model.lora.target_modules
    assert probe_steps(fs.timesteps, flux.sampling.num_steps) == [3, 4]


# ----------------------------------------------------------- 4, in the trainer: batches, 1 and 2 processes

SCOPE = {"reward.self_confidence.standardize": True, "reward.self_confidence.standardize_batch": 4}


@pytest.mark.parametrize("shuffle", [0, 2])
def test_trainer_standardises_each_batch_by_hand(weights, tmp_path, shuffle):
    from solace.trainer.trainer import Trainer

    over = {**SCOPE, "reward.self_confidence.standardize_shuffle_groups": shuffle}
    tr = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "b", **over)))
    seen = {}
    scorer = tr.scoring.rewards.components["self_confidence"].scorer
    agg = scorer.aggregate

    def spy(scores, t, batch_ids=None):
        seen.update(scores=scores, t=t, ids=batch_ids, R=agg(scores, t, batch_ids))
        return seen["R"]

    scorer.aggregate = spy
    tr.collect(0)
    s, ids = seen["scores"], seen["ids"]
    assert sorted(torch.bincount(ids).tolist()) == [4, 4]
    if not shuffle:  # 2 groups of 4: the batches are the groups, each process's share on 2 processes
        assert ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    else:  # dealt from a shuffle of both groups: some batch mixes them
        assert any(len({int(i) // 4 for i in (ids == b).nonzero().flatten()}) == 2 for b in (0, 1))
    for b in (0, 1):
        rows = (ids == b).nonzero().flatten()
        z = (s[rows] - s[rows].mean(0)) / (s[rows].std(0, unbiased=False) + 1e-6)
        assert_close(seen["R"][rows], z.mean(1))  # uniform weights: the mean over the probed steps
    assert not torch.allclose(seen["R"], aggregate(s, seen["t"], standardize=True))  # not the whole batch


@pytest.mark.parametrize("shuffle", [0, 2])
def test_per_batch_standardisation_is_the_same_on_one_and_two_processes(weights, tmp_path, shuffle):
    import json
    import os
    import subprocess

    script, env = str(HERE / "run_tiny_training.py"), {**os.environ, "OMP_NUM_THREADS": "1"}
    scope = [f"{k}={v}" for k, v in SCOPE.items()]
    over = [*scope, f"reward.self_confidence.standardize_shuffle_groups={shuffle}"]
    one, two, whole = tmp_path / "one", tmp_path / "two", tmp_path / "whole"

    def advantages(out, overrides, ranks=1):
        dist = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
        cmd = [sys.executable, *(dist if ranks == 2 else []), script, str(weights), str(out), "advantages"]
        subprocess.run([*cmd, *overrides], check=True, env=env, timeout=300 * ranks, cwd=tmp_path)
        return [json.loads((out / f"advantages_rank{r}.json").read_text()) for r in range(ranks)]

    (a1,) = advantages(one, over)
    (aw,) = advantages(whole, ["reward.self_confidence.standardize=true"])  # the whole iteration
    a2, b2 = advantages(two, over, ranks=2)
    assert (a1["world"], a2["world"]) == (1, 2) and a2["adv"] == b2["adv"]
    assert torch.allclose(torch.tensor(a1["adv"]), torch.tensor(a2["adv"]), atol=1e-4)
    # the scope matters: standardised over the whole iteration, the advantages differ by more than ten
    # times the tolerance the processes agree within
    assert (torch.tensor(a1["adv"]) - torch.tensor(aw["adv"])).abs().max() > 1e-3
