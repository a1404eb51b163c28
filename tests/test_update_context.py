"""Policy updates and reward components work from their small contexts, never from the Trainer.

* each registered update (``flow_grpo``, ``nft``) is built from an :class:`UpdateContext` put together by
  hand (a toy adapter with its LoRA, AdamW, an accelerator, streams, schedule) and takes one optimizer step
  on a rollout made here; an unregistered ``train.algorithm`` fails in one line naming the field;
* an update registered by a test trains a run through the unchanged trainer;
* the reward mixture scores through a :class:`RewardContext` with no special names: the self-confidence
  component gives the scorer's own numbers, a component registered by a test mixes in by its weight.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate import Accelerator

from solace.errors import ConfigError
from solace.models.lora import add_lora, lora_parameters
from solace.prompts import Prompt, PromptSource
from solace.rewards import confidence_reward
from solace.rewards.components import COMPONENTS, ComponentScore, RewardComponent, RewardContext
from solace.rewards.mixture import RewardMixture
from solace.sampling.rollout import GroupLayout, Rollout
from solace.trainer.config import load_config
from solace.trainer.context import UpdateContext
from solace.trainer.model_setup import load_model
from solace.trainer.setup import trained_window
from solace.trainer.updates import UPDATES, FlowGRPOUpdate, make_update
from solace.utils.seeding import Stream, TrainStreams

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import TINY_NFT, make_tiny_toy_weights, tiny_overrides  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


def _context(cfg) -> UpdateContext:
    """An update's whole world, by hand: toy adapter + LoRA, AdamW, a one-process accelerator."""
    adapter = load_model(cfg.model, "cpu")
    den = adapter.denoiser
    den.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(den, cfg.model.lora.rank, cfg.model.lora.alpha, adapter.lora_target_modules)
    params = lora_parameters(den)
    return UpdateContext(
        adapter=adapter,
        params=params,
        optimizer=torch.optim.AdamW(params, lr=0.01),
        accelerator=Accelerator(cpu=True),
        wrapped=den,
        sharded=None,
        streams=TrainStreams(3),
        sigmas=adapter.sigmas(cfg.sampling.num_steps),
        window=trained_window(cfg),
        max_grad_norm=1.0,
    )


def _rollout(ctx: UpdateContext, groups: int = 2, size: int = 2) -> Rollout:
    """A scored rollout made up here: random states along the schedule, log-probs and advantages."""
    gen = torch.Generator().manual_seed(1)
    prompts = PromptSource("toy", 0).for_iteration(0, groups)
    lay = GroupLayout.split(groups, size, 0, 1)
    cond = ctx.adapter.encode_prompts([prompts[g].text for g in lay.groups])
    null = ctx.adapter.encode_prompts([""]).expand(len(cond))
    n, steps = groups * size, ctx.sigmas.numel()
    latents = torch.randn((n, steps, *ctx.adapter.latent_shape()), generator=gen)
    ro = Rollout(prompts, lay, cond, null, latents, -torch.rand((n, steps - 1), generator=gen))
    ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return ro


@pytest.mark.parametrize("algorithm", ["flow_grpo", "nft"])
def test_each_registered_update_steps_from_a_context_alone(weights, tmp_path, algorithm):
    extra = TINY_NFT if algorithm == "nft" else {}
    cfg = load_config("toy", tiny_overrides(weights, tmp_path / "run", **extra))
    ctx = _context(cfg)
    update = make_update(ctx, cfg)
    assert type(update) is UPDATES.get(algorithm) and update.ctx is ctx
    before = [p.detach().clone() for p in ctx.params]
    stats = update(_rollout(ctx), 0)
    assert stats["train/grad_norm"] > 0 and stats["train/skipped_steps"] == 0 and update.steps == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, ctx.params, strict=True))
    assert stats["train/lr"] == 0.01  # the context's optimizer, not the config's


def test_an_unregistered_algorithm_fails_naming_the_field_and_the_registered_ones(weights, tmp_path):
    cfg = load_config("toy", tiny_overrides(weights, tmp_path / "run"))
    cfg.train.algorithm = "ppo"  # past the config's own check, as a plugin that was not loaded
    with pytest.raises(ConfigError, match=r"train\.algorithm: no policy update named 'ppo'.*flow_grpo, nft"):
        make_update(_context(cfg), cfg)
    with pytest.raises(ConfigError, match=r"^train\.algorithm: .*'grpo'"):
        load_config("toy", tiny_overrides(weights, tmp_path / "run", **{"train.algorithm": "grpo"}))


class HalfStepUpdate(FlowGRPOUpdate):
    """Flow-GRPO with half its loss: registered by a test, with no edit of the trainer."""

    calls = 0

    def loss(self, batch, term):
        HalfStepUpdate.calls += 1
        loss, parts = super().loss(batch, term)
        return 0.5 * loss, parts


@pytest.fixture
def half_step():
    UPDATES.register("half_step", HalfStepUpdate)
    try:
        yield
    finally:
        UPDATES._entries.pop("half_step")  # the registry is process-wide


def test_a_registered_update_trains_through_the_unchanged_trainer(weights, tmp_path, half_step):
    from solace.trainer.trainer import Trainer

    over = {"train.algorithm": "half_step", "train.iterations": 1, "train.report": False}
    tr = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "run", **over)))
    assert isinstance(tr.updater, HalfStepUpdate)
    tr.train()
    assert HalfStepUpdate.calls == 2 * len(tr.ctx.window)  # 8 samples in micro-batches of 4, each step
    assert (tmp_path / "run" / "lora").is_dir()


def _reward_context(ctx: UpdateContext, ro: Rollout, iteration: int = 0) -> RewardContext:
    encode = ctx.adapter.encode_prompts
    return RewardContext(ro, ctx.adapter, iteration, ctx.streams, ctx.sigmas, encode, lambda t: t, 2)


def test_the_self_confidence_component_scores_what_the_scorer_scores(weights, tmp_path):
    cfg = load_config("toy", tiny_overrides(weights, tmp_path / "run"))
    ctx = _context(cfg)
    ro = _rollout(ctx)
    mixture = RewardMixture(cfg)
    got = mixture.score(_reward_context(ctx, ro, iteration=5))
    comp = mixture.components["self_confidence"]
    idx, t = comp.timesteps(ctx.sigmas)
    seeds = [ctx.streams.seed_of(Stream.GROUP_PROBES, 5, g) for g in range(2)]
    s = comp.scorer.scores(ctx.adapter, ro.z0, ro.cond, ro.null, t, torch.tensor(ro.layout.groups), seeds)
    assert torch.equal(got.per_timestep, s) and torch.equal(got.total, comp.scorer.aggregate(s, t))
    assert set(got.stats) == {"reward/self_confidence_mean"} | {f"self_confidence/S_t{j:02d}" for j in idx}
    # another iteration draws other probes from the run's streams
    assert not torch.equal(mixture.score(_reward_context(ctx, ro, iteration=6)).total, got.total)


class LatentNorm(RewardComponent):
    """A latent reward registered by a test: minus the clean latent's mean square."""

    def score(self, ctx: RewardContext) -> ComponentScore:
        return ComponentScore(ctx.gather(-ctx.rollout.z0.pow(2).mean((1, 2, 3))), {"latent_norm/probe": 1.0})


@pytest.fixture
def latent_norm():
    COMPONENTS.register("latent_norm", lambda spec, cfg: LatentNorm(spec.name))
    try:
        yield
    finally:
        COMPONENTS._entries.pop("latent_norm")


def test_a_registered_component_mixes_by_its_weight_with_no_special_name(weights, tmp_path, latent_norm):
    comps = "[{name: self_confidence, weight: 1.0}, {name: latent_norm, weight: -2.0}]"
    cfg = load_config("toy", tiny_overrides(weights, tmp_path / "run") + [f"reward.components={comps}"])
    ctx = _context(cfg)
    ro = _rollout(ctx)
    got = RewardMixture(cfg).score(_reward_context(ctx, ro))
    norm = -ro.z0.pow(2).mean((1, 2, 3))
    assert torch.equal(got.components["latent_norm"], norm)
    assert torch.equal(got.total, got.components["self_confidence"] * 1.0 + norm * -2.0)
    assert got.stats["latent_norm/probe"] == 1.0 and "reward/latent_norm_mean" in got.stats


def test_an_unknown_component_fails_in_one_line_before_any_model_loads(weights, tmp_path):
    comps = "[{name: latent_nrom, weight: 1.0}]"
    with pytest.raises(ConfigError, match=r"reward\.components\[0\]\.name: unknown reward 'latent_nrom'"):
        load_config("toy", tiny_overrides(weights, tmp_path / "run") + [f"reward.components={comps}"])


def test_the_user_negatives_are_read_once_by_the_component_that_uses_them(weights, tmp_path):
    from solace.trainer.trainer import Trainer

    negatives = tmp_path / "neg.jsonl"
    negatives.write_text('{"prompt": "a photo of a red circle", "negatives": ["a photo of a red square"]}\n')
    over = {"reward.self_confidence.edits": "mean", "reward.self_confidence.negatives": str(negatives)}
    reads = []
    real = confidence_reward.load_negatives
    with mock.patch.object(confidence_reward, "load_negatives", lambda p: reads.append(p) or real(p)):
        tr = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "run", **over)))
    assert reads == [str(negatives)]
    editor = tr.scoring.rewards.components["self_confidence"].editor
    assert "a photo of a red square" in editor(Prompt("a photo of a red circle"))
    with mock.patch.object(confidence_reward, "load_negatives", lambda p: reads.append(p) or real(p)):
        RewardMixture(tr.cfg)  # the spy sees every read: a second one in the trainer would count
    assert reads == [str(negatives)] * 2
