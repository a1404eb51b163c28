"""The self-confidence scorer: one implementation behind the trainer and the analysis commands."""

from __future__ import annotations

import pytest
import torch
from mathcheck import assert_close

from solace.errors import ConfigError
from solace.models.base import AdapterBase, Conditioning, adapters_disabled
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer, probe_steps
from solace.rewards.self_confidence import confidence_scores, draw_probes, probe_mse


class _Lin(torch.nn.Module):
    """v(z, t, c) = W z + c: a tiny denoiser whose LoRA-off reference is W = identity."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(4))


class _Adapter(AdapterBase):
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


def test_edit_contrast_forms_by_hand():
    from solace.rewards.self_confidence import edit_contrast

    s_c, s_e = torch.tensor([[1.0]]), torch.tensor([[[0.5], [2.0]]])
    assert_close(edit_contrast(s_c, s_e, "mean"), [[-0.25]])
    assert_close(edit_contrast(s_c, s_e, "max"), [[-1.0]])
    expected = 1.0 - 0.5 * torch.log(
        torch.exp(torch.tensor(2.0)) + torch.exp(torch.tensor(1.0)) + torch.exp(torch.tensor(4.0))
    )
    assert_close(edit_contrast(s_c, s_e, "lse", temperature=0.5), [[float(expected)]])


class _PointMass(AdapterBase):
    """The exact velocity of a point-mass data distribution per prompt, x0 = mu_c:
    v(z, t, c) = (z - mu_c) / t. Then eps_hat = v + z0 = eps + (z0 - mu_c) / t, so
    MSE_t = ||z0 - mu_c||^2 / (t^2 D) whatever the probes."""

    name, dtype = "point_mass", torch.float32

    def __init__(self):
        self.denoiser = torch.nn.Identity()

    def velocity(self, z, t, cond):
        return (z - cond.tensors["mu"]) / t.reshape(-1, 1)


def test_edits_variant_is_the_classifier_posterior_on_a_point_mass_field():
    """An image at mu_c scored against edits c' with means mu_c': S(c) = -log(delta) and S(c') =
    -log(||mu_c - mu_c'||^2 / (t^2 D) + delta), so the lse form is the log-posterior of c, by hand."""
    D, delta, t = 4, 1e-3, torch.tensor([0.5, 0.25])
    mu_c, mu_a, mu_b = torch.zeros(D), torch.full((D,), 0.1), torch.full((D,), 0.2)
    cond = Conditioning({"mu": mu_c.reshape(1, D)})
    edits = Conditioning({"mu": torch.stack([mu_a, mu_b])})
    z0 = mu_c.reshape(1, D)
    cfg = SelfConfidenceCfg(num_probes=2, delta=delta, edits="lse", edit_temperature=1.0)
    got = SelfConfidenceScorer(cfg).scores(
        _PointMass(), z0, cond, None, t, torch.zeros(1), [3], edit_conds=[edits]
    )
    for j, tj in enumerate(t.tolist()):
        s_c = -torch.log(torch.tensor(delta))
        s_e = [
            -torch.log(torch.tensor(float(((mu_c - m) ** 2).sum()) / (tj**2 * D) + delta))
            for m in (mu_a, mu_b)
        ]
        expected = s_c - torch.logsumexp(torch.stack([s_c, *s_e]), 0)
        assert_close(got[0, j], expected, rtol=1e-5, atol=1e-5)
    assert float(got.max()) <= 0


@pytest.mark.parametrize("mode", ["group", "per_sample_timestep"])
def test_edit_scores_use_exactly_the_prompts_probes(mode):
    """With a velocity that ignores the prompt, S(c') equals S(c) bitwise only if every candidate saw the
    same probes and timesteps: the mean contrast is exactly 0 (different probes would leave a difference)."""

    class _Blind(_Adapter):
        def velocity(self, z, t, cond):
            return self.denoiser.lin(z) * t.reshape(-1, 1)

    ad = _Blind()
    z0 = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    cond, null = _cond([0.1, 0.1, 0.2, 0.2]), _cond([0.0] * 4)
    edits = [_cond([0.5, -0.5, 0.9]), _cond([0.7, 0.3, -0.1])]
    cfg = SelfConfidenceCfg(num_probes=4, edits="mean", probe_mode=mode)
    t = torch.tensor([0.9, 0.4, 0.1])
    got = SelfConfidenceScorer(cfg).scores(
        ad, z0, cond, null, t, torch.tensor([0, 0, 1, 1]), [1, 2], edit_conds=edits
    )
    assert float(got.abs().max()) < 1e-6  # float rounding of the batched forwards at most
    # the check can fail: other probes move S(c) itself by far more than that
    plain = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=4, probe_mode=mode))
    a = plain.scores(ad, z0, cond, null, t, torch.tensor([0, 0, 1, 1]), [1, 2])
    b = plain.scores(ad, z0, cond, null, t, torch.tensor([0, 0, 1, 1]), [5, 6])
    assert float((a - b).abs().max()) > 1e-3


def test_candidate_edits_toy_records_text_rules_and_the_empty_fallback():
    from solace.rewards.prompt_edits import candidate_edits, cycle_kinds
    from solace.toy.edits import toy_edits
    from solace.toy.world import load_heldout

    rec = next(r for r in load_heldout() if r.tag == "color_attr")
    every = toy_edits(rec)
    assert [e.kind for e in every][:8] == ["colour"] * 8  # in kind order, 8 colour edits come first
    assert candidate_edits(rec.prompt, rec.to_json(), limit=50) == [e.prompt for e in cycle_kinds(every)]
    assert sorted(candidate_edits(rec.prompt, rec.to_json(), limit=50)) == sorted(e.prompt for e in every)
    first = {e.prompt: e.kind for e in every}
    kinds3 = [first[p] for p in candidate_edits(rec.prompt, rec.to_json(), limit=3)]
    assert kinds3 == ["colour", "binding", "shape"]  # the kinds take turns: the first 3 hold every kind
    text = candidate_edits("a red car left of a tree", limit=50)
    assert "a red car right of a tree" in text and all(p != "a red car left of a tree" for p in text)
    assert candidate_edits("a photo") == [""]


def test_rerank_and_score_take_the_edits_form(tmp_path):
    """``solace score/rerank --edits lse`` score each prompt against its minimal edits; the settings say so,
    the log-posterior form is <= 0, and a bad form is one line naming --edits."""
    from trainer_helpers import make_tiny_toy_weights
    from typer.testing import CliRunner

    from solace.cli.main import app

    w = make_tiny_toy_weights(tmp_path / "w.safetensors")
    common = ["--steps", "2", "--probes", "2", "--model", str(w), "--threads", "1"]
    res = CliRunner().invoke(
        app,
        [
            "score",
            "-p",
            "a photo of a red circle",
            "--generate",
            "2",
            *common,
            "--edits",
            "lse",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 0, res.output
    import json

    doc = json.loads((tmp_path / "s" / "score.json").read_text())
    assert doc["settings"]["edits"] == "lse" and all(r["R"] <= 0 for r in doc["scores"])
    bad = CliRunner().invoke(
        app, ["rerank", "--limit", "1", "--n", "2", "--seeds", "0", *common, "--edits", "avg"]
    )
    assert bad.exit_code == 2 and "--edits" in bad.output
