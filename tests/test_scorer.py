"""The self-confidence scorer: one implementation behind the trainer and the analysis commands."""

from __future__ import annotations

import pytest
import torch
from mathcheck import assert_close

from solace.errors import ConfigError
from solace.models.base import Conditioning, adapters_disabled
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer, probe_steps
from solace.rewards.self_confidence import confidence_scores, draw_probes, probe_mse


class _Lin(torch.nn.Module):
    """v(z, t, c) = W z + c: a tiny denoiser whose LoRA-off reference is W = identity."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(4))


class _Adapter:
    name = "tiny"
    dtype = torch.float32

    def __init__(self):
        from solace.models.lora import add_lora

        self.denoiser = _Lin()
        add_lora(self.denoiser, 2, 2, ["lin"])
        with torch.no_grad():  # LoRA starts as a no-op: perturb lora_B so the policy differs from the base
            for n, p in self.denoiser.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))

    def velocity(self, z, t, cond: Conditioning):
        return self.denoiser.lin(z) + cond.tensors["c"]


def _cond(values):
    return Conditioning({"c": torch.tensor(values, dtype=torch.float32).reshape(-1, 1).expand(-1, 4).clone()})


def test_offline_scores_over_several_groups_use_the_lora_off_base():
    """Offline scoring over two prompt groups (it once crashed: a context manager reused across groups)
    equals the online scores with the LoRA switched off."""
    ad = _Adapter()
    z0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    cond, null = _cond([0.1] * 3 + [0.3] * 3), _cond([0.0] * 6)
    t = torch.tensor([0.9, 0.5, 0.2])
    groups, seeds = torch.tensor([0, 0, 0, 1, 1, 1]), [11, 12]
    off = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=2, online=False)).scores(
        ad, z0, cond, null, t, groups, seeds
    )
    on = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=2))
    with adapters_disabled(ad.denoiser):
        ref = on.scores(ad, z0, cond, null, t, groups, seeds)
    assert torch.equal(off, ref)
    assert not torch.equal(on.scores(ad, z0, cond, null, t, groups, seeds), ref)


def test_scores_equal_the_pure_functions_with_the_group_probes():
    """Each group's rows are scored with the probes drawn from that group's seed (Eqs. 9-12), and the
    contrastive form subtracts the empty prompt's scores computed with the same probes."""
    ad = _Adapter()
    z0 = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    cond, null = _cond([0.2, 0.2, -0.4, -0.4]), _cond([0.0] * 4)
    t = torch.tensor([0.8, 0.3])
    groups, seeds = torch.tensor([0, 0, 1, 1]), [5, 6]
    sc = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=4))
    got = sc.scores(ad, z0, cond, null, t, groups, seeds)
    contrast = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=4, contrastive=True)).scores(
        ad, z0, cond, null, t, groups, seeds
    )
    for g, rows in ((0, [0, 1]), (1, [2, 3])):
        probes = draw_probes(4, (4,), 2, 2, "group", torch.Generator().manual_seed(seeds[g]))
        c, n = cond.index(rows), null.index(rows)

        def v(z, tt, idx, cc=c):
            return ad.velocity(z, tt, cc.index(idx))

        s_c = confidence_scores(probe_mse(v, z0[rows], t, probes))
        s_u = confidence_scores(
            probe_mse(lambda z, tt, idx, nn=n: ad.velocity(z, tt, nn.index(idx)), z0[rows], t, probes)
        )
        assert_close(got[rows], s_c, atol=0, rtol=0)
        assert_close(contrast[rows], s_c - s_u, atol=1e-6, rtol=0)


def test_settings_are_checked_in_one_place():
    for bad, field in (
        (SelfConfidenceCfg(num_probes=3), "num_probes"),
        (SelfConfidenceCfg(delta=0.0), "delta"),
        (SelfConfidenceCfg(max_batch=0), "max_batch"),
        (SelfConfidenceCfg(timesteps="1,99"), "timesteps"),
    ):
        with pytest.raises(ConfigError, match=f"reward.self_confidence.{field}"):
            bad.check(num_steps=10)
    assert probe_steps("later_half", 10) == [5, 6, 7, 8, 9] and probe_steps("0,3", 4) == [0, 3]
    with pytest.raises(ConfigError, match="null"):
        SelfConfidenceScorer(SelfConfidenceCfg(num_probes=2, contrastive=True)).scores(
            _Adapter(), torch.zeros(2, 4), _cond([0, 0]), None, torch.tensor([0.5]), torch.zeros(2), [0]
        )
