"""``premise``: reward components scored on a fixed slice of every training batch for the log only, their
within-group AUC against the per-sample correctness. Hand-computed slices and AUCs, a probe whose scores
are known, the config's refusals, a self-confidence entry's kwargs acting, and a tiny run that logs the
premise and trains bitwise as the same run without it."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from solace.cli.main import app
from solace.errors import ConfigError
from solace.models.base import Conditioning
from solace.prompts import Prompt
from solace.rewards.components import (
    COMPONENTS,
    ComponentScore,
    RewardComponent,
    RewardContext,
    build_component,
)
from solace.rewards.mixture import component_prompts
from solace.sampling.rollout import GroupLayout, Rollout
from solace.trainer.config import PremiseComponent, load_config
from solace.trainer.premise import PremiseProbe, premise_slice, premise_stats
from solace.trainer.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import TINY_NFT, tiny_overrides  # noqa: E402


def test_the_slice_by_hand():
    # one process, 4 groups of 4, a slice of 2: the first two groups, as they are
    one = premise_slice(GroupLayout.split(4, 4, 0, 1), 2, world=1, rank=0)
    assert one.source_groups == [0, 1] and one.global_rows == list(range(8)) and one.local_rows == 8
    assert (one.layout.num_groups, one.layout.start, one.layout.stop) == (2, 0, 8)
    # two processes (groups 0-1 and 2-3), a slice of 2: each process's first group, renumbered 0 and 1
    r0 = premise_slice(GroupLayout.split(4, 4, 0, 2), 2, world=2, rank=0)
    r1 = premise_slice(GroupLayout.split(4, 4, 1, 2), 2, world=2, rank=1)
    assert r0.source_groups == r1.source_groups == [0, 2]
    assert r0.global_rows == [0, 1, 2, 3, 8, 9, 10, 11] == r1.global_rows
    assert (r0.layout.start, r0.layout.stop, r1.layout.start, r1.layout.stop) == (0, 4, 4, 8)
    assert r1.local_rows == 4
    # must fail: 3 groups over 2 processes (a process would hold half a group); a slice that does not split
    # over the processes; a slice larger than a process's share
    with pytest.raises(ConfigError, match="^premise.groups: .*3 groups do not split evenly over 2"):
        premise_slice(GroupLayout(3, 4, 0, 6), 2, world=2, rank=0)
    with pytest.raises(ConfigError, match="^premise.groups: must be a multiple of the 2 processes"):
        premise_slice(GroupLayout.split(4, 4, 0, 2), 3, world=2, rank=0)
    with pytest.raises(ConfigError, match="^premise.groups"):
        premise_slice(GroupLayout.split(4, 4, 0, 2), 6, world=2, rank=0)


def test_the_auc_by_hand():
    # group 0: correct {3, 0} against incorrect {1, 2}: 3 beats both, 0 neither -> 2 of 4 pairs = 0.5;
    # group 1: correct {4} against {1, 2, 3}: 3 of 3 -> 1.0; group 2: all correct, no pair (left out)
    scores = torch.tensor([3.0, 1, 2, 0, 1, 2, 3, 4, 5, 5, 5, 5])
    correct = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1])
    out = premise_stats("sc", scores, correct, groups=3)
    assert out == {"premise/sc_auc": 0.75, "premise/sc_groups": 2.0}
    # ties count 1/2: a group whose scores are all equal is at chance
    assert premise_stats("sc", torch.zeros(4), torch.tensor([1.0, 0, 1, 0]), 1)["premise/sc_auc"] == 0.5
    # must fail: scores that rank the incorrect first give the complement, not the same number
    rev = premise_stats("sc", -scores, correct, groups=3)["premise/sc_auc"]
    assert rev == pytest.approx(0.25)
    # no group holds both kinds: NaN and 0 groups, never a made-up number
    none = premise_stats("sc", scores[:4], torch.ones(4), 1)
    assert math.isnan(none["premise/sc_auc"]) and none["premise/sc_groups"] == 0.0


class _Index(RewardComponent):
    """A component whose score of a sample is its clean latent's value (the test writes the global index)."""

    def score(self, ctx: RewardContext) -> ComponentScore:
        return ComponentScore(ctx.gather(ctx.rollout.z0.flatten().float()))


COMPONENTS.register("test_premise_index", lambda spec, cfg: _Index(spec.name))


def _context(n_groups: int, g: int, iteration: int = 0) -> RewardContext:
    n = n_groups * g
    latents = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 2, 1).clone()
    cond = Conditioning({"x": torch.arange(n, dtype=torch.float32).view(n, 1)})
    ro = Rollout(
        [Prompt(f"p{i}") for i in range(n_groups)], GroupLayout.split(n_groups, g, 0, 1), cond, cond,
        latents, None,
    )  # fmt: skip
    return RewardContext(ro, None, iteration, None, torch.zeros(1), None, lambda t: t)  # type: ignore[arg-type]


def test_a_probe_with_known_scores_on_its_slice():
    cfg = load_config("toy", ["sampling.prompts_per_step=4", "sampling.group_size=4"], check_paths=False)
    cfg.premise.components = [PremiseComponent(name="test_premise_index", label="idx")]
    cfg.premise.groups, cfg.premise.every = 2, 2
    probe = PremiseProbe(cfg, GroupLayout.split(4, 4, 0, 1), world=1, rank=0)
    # correctness of the 16 samples: group 0 correct at rows 1, 3 (scores 1, 3 against 0, 2: pairs 1>0, 3>0,
    # 3>2 of 4 -> 0.75); group 1 correct at row 4 only (the lowest: 0); groups 2-3 outside the slice
    correct = torch.zeros(16)
    correct[[1, 3, 4, 10, 11]] = 1.0
    warned: list[str] = []
    stats = probe.score(_context(4, 4), {"train/strict_acc": correct}, warned.append)
    assert stats == {"premise/idx_auc": pytest.approx((0.75 + 0.0) / 2), "premise/idx_groups": 2.0}
    assert probe.score(_context(4, 4, iteration=1), {"train/strict_acc": correct}, warned.append) == {}
    # the label missing from the batch statistics: one warning naming premise.label, nothing logged
    for _ in range(2):
        assert probe.score(_context(4, 4), {"monitor/foreground": correct}, warned.append) == {}
    assert len(warned) == 1 and warned[0].startswith("premise.label: the batch statistics have no")


def test_a_self_confidence_entry_takes_its_kwargs():
    cfg = load_config("toy", [], check_paths=False)
    assert not cfg.reward.self_confidence.contrastive
    comp = build_component(PremiseComponent(kwargs={"contrastive": True, "num_probes": 4}), cfg)
    assert comp.cfg.contrastive and comp.cfg.num_probes == 4  # type: ignore[attr-defined]
    plain = build_component(PremiseComponent(), cfg)
    assert not plain.cfg.contrastive and plain.cfg.num_probes == 8  # type: ignore[attr-defined]


PREMISE = "premise.components=[{name: self_confidence, label: paper}, {name: self_confidence, label: contrastive, kwargs: {contrastive: true}}]"  # noqa: E501


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "premise.components=[{name: self_confidence}, {name: self_confidence}]",
            "premise.components: two entries log under one label",
        ),
        ("premise.components=[{name: self_confidence, label: 'a b'}]", "premise.components[0].label: 'a b'"),
        ("premise.groups=5", "premise.groups: is a slice of the iteration's 4 prompt groups"),
        (
            "premise.components=[{name: self_confidence, kwargs: {contrastve: true}}]",
            "premise.components[0].kwargs: Key 'contrastve' not in 'SelfConfidenceCfg'",
        ),
        (
            "premise.components=[{name: self_confidence, kwargs: {num_probes: 3}}]",
            "premise.components[0].kwargs.num_probes",
        ),
        (
            "reward.components=[{name: self_confidence, kwargs: {weighting: cubic}}]",
            "reward.components[0].kwargs: Invalid value 'cubic'",
        ),
        ("premise.components=[{name: nosuchreward}]", "premise.components[0]"),
    ],
)
def test_the_config_refuses_in_one_line(override, message):
    runner = CliRunner()
    extra = [] if override.startswith("premise.components") else [PREMISE]
    res = runner.invoke(app, ["config", "check", "toy", "sampling.prompts_per_step=4", *extra, override])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    # the same config without the bad entry passes (the case that must not fail)
    ok = runner.invoke(app, ["config", "check", "toy", "sampling.prompts_per_step=4", PREMISE])
    assert ok.exit_code == 0, ok.output


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "log.csv") as fh:
        return list(csv.DictReader(fh))


def _pairwise_auc(scores: list[float], correct: list[bool]) -> float | None:
    """The AUC by counting pairs (ties 1/2), written out here, not through solace.evaluation.analysis."""
    pos = [s for s, c in zip(scores, correct, strict=True) if c]
    neg = [s for s, c in zip(scores, correct, strict=True) if not c]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# the shipped toy base (its samples are right and wrong in one group, unlike a tiny random net's), small
SMALL = {"model.name": "toy", "sampling.group_size": 8, "sampling.num_steps": 6, "sampling.cfg_scale": 3.0}


def test_the_logged_auc_is_the_training_rewards_auc_on_the_whole_batch(tmp_path):
    # the training reward is self-confidence (paper form) and the premise scores the whole batch with the
    # same form: the same probes (a group's seed), so its AUC is the AUC of the run's own rewards against
    # the evaluator's verdicts, recomputed here pair by pair
    over = tiny_overrides("toy", tmp_path / "run", **TINY_NFT, **SMALL)
    tr = Trainer(load_config("toy", [*over, PREMISE, "premise.groups=2"]))
    ro = tr.sample_rollout(0)
    stats = tr.score(ro, 0)
    images = tr.adapter.decode(ro.z0)
    correct = tr.adapter.batch_statistics(images, ro.metas)["train/strict_acc"] > 0.5
    per_group = [
        _pairwise_auc(ro.rewards[g * 8 : (g + 1) * 8].tolist(), correct[g * 8 : (g + 1) * 8].tolist())
        for g in range(2)
    ]
    held = [x for x in per_group if x is not None]
    assert held, "the base's samples should be right and wrong within some group"
    assert stats["premise/paper_groups"] == len(held)
    assert stats["premise/paper_auc"] == pytest.approx(sum(held) / len(held), abs=1e-9)
    # the contrastive form is another number (it subtracts the empty prompt's S_t)
    assert stats["premise/contrastive_groups"] == len(held)
    assert stats["premise/contrastive_auc"] != pytest.approx(stats["premise/paper_auc"], abs=1e-9)


def test_a_run_logs_the_premise_and_trains_bitwise_the_same(tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("premise", [PREMISE, "premise.groups=1"])):
        over = tiny_overrides("toy", tmp_path / name, **TINY_NFT, **SMALL)
        Trainer(load_config("toy", [*over, *extra])).train()
        runs[name] = tmp_path / name
    a = load_file(str(runs["plain"] / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(runs["premise"] / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 0  # it trained
    plain, prem = _rows(runs["plain"]), _rows(runs["premise"])
    for x, y in zip(plain, prem, strict=True):
        for k, v in x.items():
            if not k.startswith("time/"):
                assert y[k] == v, k  # every logged value the same, to the digit
        for label in ("paper", "contrastive"):
            groups = float(y[f"premise/{label}_groups"])
            auc = float(y[f"premise/{label}_auc"])
            assert groups in (0.0, 1.0)  # a slice of one group
            assert (math.isnan(auc) and groups == 0) or 0.0 <= auc <= 1.0
        assert float(y["time/premise"]) > 0
    assert not any(k.startswith("premise/") for k in plain[0])


def test_solace_embed_encodes_what_the_logged_components_encode():
    cfg = load_config("toy", [], check_paths=False)
    prompts = [Prompt("a red circle and a blue square")]
    assert component_prompts(cfg, prompts) == []  # the paper form encodes nothing beyond the prompt
    cfg.premise.components = [PremiseComponent(label="edits", kwargs={"edits": "mean"})]
    edits = component_prompts(cfg, prompts)
    assert edits and all(e != prompts[0].text for e in edits)  # the logged edits form's competing prompts
