"""The trainer end to end on a tiny toy model: rewards, distributed equivalence, kill/resume, configs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from solace.errors import ConfigError
from solace.trainer.config import load_config
from solace.trainer.trainer import Trainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from trainer_helpers import TINY_NFT, make_tiny_toy_weights, tiny_overrides  # noqa: E402

SCRIPT = HERE / "run_tiny_training.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


def test_self_confidence_training_runs_and_logs_finite_values(weights, tmp_path):
    cfg = load_config(
        "toy",
        tiny_overrides(
            weights,
            tmp_path / "run",
            **{
                "train.report": True,
                "eval.prompts_limit": 6,
                "eval.samples_per_prompt": 1,
                "eval.image_every": 2,
            },
        ),
    )
    res = Trainer(cfg).train()
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(","), strict=True))
    for key in (
        "reward/mean",
        "train/kl",
        "train/policy_loss",
        "train/grad_norm",
        "self_confidence/S_t00",
        "time/sampling",
        "time/reward",
        "time/update",
        "monitor/texture",
        "monitor/foreground",
    ):
        assert key in last and torch.isfinite(torch.tensor(float(last[key]))), key
    assert float(last["train/grad_norm"]) > 0
    assert (tmp_path / "run" / "report.md").exists() and (tmp_path / "run" / "report_curves.png").exists()
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) >= 2
    assert res["evals"][0]["iteration"] == 0 and res["evals"][-1]["iteration"] == 2
    for ev in res["evals"]:  # the evaluation images' collapse statistics
        im = ev["images"]
        assert 0 <= im["foreground"] <= 1 and im["objects"] >= 0 and im["pixel_std"] > 0
    lora = load_file(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
    assert any(tb.name.startswith("events") for tb in (tmp_path / "run" / "tb").iterdir())
    mon = json.loads((tmp_path / "run" / "monitor.json").read_text())
    assert mon["verdict"] == res["monitor"] and isinstance(mon["warnings"], list)


def test_max_minutes_stops_early_then_evaluates_reports_and_resumes(weights, tmp_path):
    over = tiny_overrides(
        weights,
        tmp_path / "t",
        **{
            "train.iterations": 3,
            "train.checkpoint_every": 10,  # the stop writes its own checkpoint
            "train.max_minutes": 1e-9,  # out of time after the first iteration
            "train.report": True,
            "eval.prompts_limit": 6,
            "eval.samples_per_prompt": 1,
        },
    )
    res = Trainer(load_config("toy", over)).train()
    assert res["iterations"] == 1
    assert [e["iteration"] for e in res["evals"]] == [0, 1]
    ckpts = sorted(p.name for p in (tmp_path / "t" / "checkpoints").iterdir())
    assert ckpts == ["iter_000001", "latest"], ckpts
    report = (tmp_path / "t" / "report.md").read_text()
    assert "iterations: 1 of 3 (stopped by train.max_minutes=1e-09)" in report
    assert len((tmp_path / "t" / "log.csv").read_text().splitlines()) == 2  # header + 1 iteration
    # resumed without a budget, the run goes on to the planned 3 iterations
    res2 = Trainer(load_config("toy", [*over, "train.max_minutes=0"])).train(resume=True)
    assert res2["iterations"] == 3 and res2["evals"][-1]["iteration"] == 3
    saved = json.loads((tmp_path / "t" / "evals.json").read_text())
    # the stop's evaluation precedes its checkpoint, so the resumed run's record keeps it
    assert [e["iteration"] for e in saved] == [0, 1, 3] and saved[-1]["strict"] == res2["evals"][-1]["strict"]
    assert len((tmp_path / "t" / "log.csv").read_text().splitlines()) == 4


def test_a_resumed_runs_wall_time_counts_every_process_up_to_its_checkpoint(weights, tmp_path):
    """The run's wall time (``solace ablate``'s minutes) is that of every process that trained it: the
    checkpoint keeps the time up to it, the resumed process adds its own; a checkpoint without the record
    (an earlier version's) gives NaN, never the resumed part alone."""
    over = tiny_overrides(weights, tmp_path / "t", **{"train.iterations": 1, "train.checkpoint_every": 1})
    res = Trainer(load_config("toy", over)).train()
    state = tmp_path / "t" / "checkpoints" / "iter_000001" / "state.json"
    recorded = json.loads(state.read_text())
    assert 0 < recorded["wall_s"] <= res["wall_s"]
    for before in (1000.0, None):  # an earlier process's 1000 s; then a checkpoint without the record
        if before is None:
            recorded.pop("wall_s")
        else:
            recorded["wall_s"] = before
        state.write_text(json.dumps(recorded))
        (tmp_path / "t" / "checkpoints" / "latest").write_text("iter_000001")
        for later in (tmp_path / "t" / "checkpoints").glob("iter_00000[2-9]"):
            shutil.rmtree(later)
        trainer = Trainer(load_config("toy", [*over, "train.iterations=2"]))
        started = time.time()
        res2 = trainer.train(resume=True)
        ended = time.time()
        assert res2["iterations"] == 2
        if before is None:
            assert math.isnan(res2["wall_s"])
        else:
            assert started - trainer.created <= res2["wall_s"] - before <= ended - trainer.created


@pytest.mark.parametrize("same", [True, False])
def test_same_init_noise_shares_the_initial_noise_within_a_group(weights, tmp_path, same):
    """``sampling.same_init_noise`` gives every sample of a group the same z_1 (DanceGRPO); the default gives
    each sample its own (the paper). Groups never share theirs; the SDE noise always differs."""
    over = tiny_overrides(weights, tmp_path / "r")
    over += [f"sampling.same_init_noise={same}", "reward.components=[{name: toy_geneval, weight: 1.0}]"]
    tr = Trainer(load_config("toy", over))
    z = tr.collect(0).latents  # (N, T + 1, ...): z[:, 0] is the initial noise
    G = tr.cfg.sampling.group_size
    for g in range(tr.cfg.sampling.prompts_per_step):
        grp = z[g * G : (g + 1) * G]
        assert all(torch.equal(grp[0, 0], grp[i, 0]) for i in range(1, G)) == same
        assert not torch.equal(grp[0, -1], grp[1, -1])
    assert not torch.equal(z[0, 0], z[G, 0])


def test_explicit_train_steps_replace_the_rho_window(weights, tmp_path):
    over = tiny_overrides(
        weights, tmp_path / "r", **{"grpo.train_steps": "'2,1'", "sampling.sde_window_only": True}
    )
    tr = Trainer(load_config("toy", over))
    assert tr.ctx.window == [1, 2]
    ro = tr.collect(0)
    lp = ro.log_probs
    # SDE (non-zero log-prob) exactly on the trained steps, ODE (log-prob 0) elsewhere
    assert (lp[:, [1, 2]] != 0).all() and (lp[:, [0, 3]] == 0).all()
    stats = tr.update(ro, 0)
    assert stats["train/grad_norm"] > 0


def test_external_reward_only_training_with_the_toy_evaluator(weights, tmp_path):
    over = tiny_overrides(weights, tmp_path / "ext")
    over += ["reward.components=[{name: toy_geneval, weight: 1.0, kwargs: {mode: mixed}}]"]
    cfg = load_config("toy", over)
    tr = Trainer(cfg)
    assert list(tr.scoring.rewards.components) == ["toy_geneval"]
    tr.train()
    rows = (tmp_path / "ext" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "reward/toy_geneval_mean" in header and "self_confidence/S_t00" not in header


def test_dense_verifiable_reward_and_a_jsonl_eval_file_scored_exactly(weights, tmp_path):
    """mode=dense trains; a .jsonl eval file with GenEval metadata is evaluated by the exact evaluator."""
    from solace.toy.evaluate import eval_records
    from solace.toy.world import load_heldout

    recs = [r for r in load_heldout() if r.tag in ("single_object", "colors")][:4]
    evf = tmp_path / "eval.jsonl"
    evf.write_text("".join(json.dumps(r.to_json()) + "\n" for r in recs))
    extra = {"eval.prompts": str(evf), "train.iterations": 1, "train.report": True}
    over = tiny_overrides(weights, tmp_path / "d", **extra)
    over += ["reward.components=[{name: toy_geneval, weight: 1.0, kwargs: {mode: dense}}]"]
    tr = Trainer(load_config("toy", over))
    assert [r.prompt for r in eval_records(str(evf))] == [r.prompt for r in recs]
    tr.train()
    assert [e["iteration"] for e in tr.evals] == [0, 1]
    assert set(tr.evals[0]["categories"]) == {"single_object", "colors"}
    # a plain .txt file has no metadata: nothing to score exactly
    txt = tmp_path / "p.txt"
    txt.write_text("a photo of a circle\n")
    over_txt = tiny_overrides(weights, tmp_path / "t", **{"eval.prompts": str(txt)})
    tr2 = Trainer(load_config("toy", over_txt))
    assert eval_records(str(txt)) is None and tr2.evaluate(0) is None


def test_on_policy_first_update_has_ratio_one(weights, tmp_path):
    cfg = load_config("toy", tiny_overrides(weights, tmp_path / "r", **{"train.iterations": 1}))
    tr = Trainer(cfg)
    ro = tr.collect(0)
    stats = tr.update(ro, 0)
    # the first minibatch is on-policy: recomputed log-probs equal the sampling ones up to float noise
    assert abs(stats["train/ratio_min"] - 1) < 1e-3 and abs(stats["train/ratio_max"] - 1) < 1e-3


def test_updates_raise_the_log_prob_of_positive_advantage_samples(weights, tmp_path):
    """The sign check: a few updates on one batch make the samples with A > 0 more likely and those with
    A < 0 less likely (a sign or indexing bug in log-probs or advantages breaks this first)."""
    from solace.sampling.sampler import step_policy

    # the self-confidence reward: a tiny random model never draws a correct scene, so the evaluator would tie
    over = tiny_overrides(
        weights, tmp_path / "r", **{"grpo.beta": 0.0, "grpo.clip_range": 10.0, "optim.lr": 1e-3}
    )
    tr = Trainer(load_config("toy", over))
    ro = tr.collect(0)
    assert (ro.advantages != 0).all()

    def log_probs() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(
                [
                    step_policy(
                        tr.adapter, ro.latents[:, j], ro.latents[:, j + 1], tr.ctx.sigmas, j,
                        ro.cond, ro.null, tr.cfg.sampling.cfg_scale, tr.cfg.sampling.noise_level,
                    ).log_prob
                    for j in tr.ctx.window
                ],
                1,
            ).sum(1)  # fmt: skip

    before = log_probs()
    tr.update(ro, 0)
    delta, adv = log_probs() - before, ro.advantages
    assert (adv * delta).sum() > 0  # the surrogate sum_i A_i log p_i went up
    assert delta[adv > 0].mean() > delta[adv < 0].mean()
    assert torch.corrcoef(torch.stack([delta, adv]))[0, 1] > 0.5


def test_gradient_accumulation_counts_the_micro_steps_trained(weights, tmp_path):
    """Splitting the same samples into smaller micro-batches must give the same update."""
    grads = []
    for mb in (8, 2):
        cfg = load_config(
            "toy",
            tiny_overrides(
                weights, tmp_path / f"g{mb}", **{"train.micro_batch_size": mb, "train.iterations": 1}
            ),
        )
        tr = Trainer(cfg)
        ro = tr.collect(0)
        tr.ctx.optimizer.step = lambda: None  # keep the parameters; inspect the accumulated gradient
        tr.ctx.optimizer.zero_grad = lambda set_to_none=True: None
        tr.update(ro, 0)
        grads.append(torch.cat([p.grad.flatten() for p in tr.params]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_two_process_gloo_run_matches_one_process(weights, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(weights), str(one), "advantages"], check=True, env=ENV, timeout=300
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(SCRIPT),
        str(weights),
        str(two),
        "advantages",
    ]
    subprocess.run(cmd, check=True, env=ENV, timeout=600, cwd=tmp_path)
    a1 = json.loads((one / "advantages_rank0.json").read_text())
    a2 = json.loads((two / "advantages_rank0.json").read_text())
    b2 = json.loads((two / "advantages_rank1.json").read_text())
    assert a1["world"] == 1 and a2["world"] == 2
    assert a2["adv"] == b2["adv"]  # both ranks agree after the gather
    assert torch.allclose(torch.tensor(a1["adv"]), torch.tensor(a2["adv"]), atol=1e-4)
    assert abs(a1["final_latents_sum"] - a2["final_latents_sum"]) < 1e-2


def test_finish_is_a_no_op_in_one_process_and_ends_a_gloo_group(tmp_path):
    from solace.trainer import distributed

    assert distributed.world_size() == 1 and not distributed.leave_process_group()
    distributed.finish()  # one process: returns, the interpreter goes on
    code = (
        "import os, sys, torch.distributed as dist\n"
        "from solace.trainer import distributed\n"
        "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
        "assert distributed.world_size() == 1\n"
        "distributed.finish()\n"
        "assert not dist.is_initialized()\n"
        "print('left')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store")], env=ENV, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "left"


NFT_TINY = [f"{k}={v}" for k, v in TINY_NFT.items()]


def _kill_run(algorithm: str) -> list[str]:
    return ["train.iterations=4", *(NFT_TINY if algorithm == "nft" else [])]


@pytest.fixture(scope="module")
def uninterrupted(weights, tmp_path_factory):
    """The uninterrupted 4-iteration run of an algorithm that the kill-and-resume tests compare with, made
    once (a checkpoint every iteration, all kept)."""
    made: dict[str, Path] = {}

    def run(algorithm: str) -> Path:
        if algorithm not in made:
            out = tmp_path_factory.mktemp(f"full_{algorithm}") / "full"
            cmd = [sys.executable, str(SCRIPT), str(weights), str(out), "train", *_kill_run(algorithm)]
            subprocess.run(cmd, check=True, env=ENV, timeout=600)
            made[algorithm] = out
        return made[algorithm]

    return run


def _kill_after(weights: Path, out: Path, extra: list[str], iteration: int) -> None:
    """Start a run and kill -9 it once the checkpoint of ``iteration`` exists."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(weights), str(out), "train", *extra], env=ENV)
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "checkpoints" / f"iter_{iteration:06d}").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _resume(weights: Path, out: Path, extra: list[str]) -> None:
    """``--resume`` the run in ``out`` to its end (a subprocess, as it was started)."""
    cmd = [sys.executable, str(SCRIPT), str(weights), str(out), "train", *extra, "resume=1"]
    subprocess.run(cmd, check=True, env=ENV, timeout=600)


def _same_lora(a: Path, b: Path) -> None:
    x = load_file(str(a / "lora" / "pytorch_lora_weights.safetensors"))
    y = load_file(str(b / "lora" / "pytorch_lora_weights.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("algorithm", ["flow_grpo", "nft"])
def test_sigkill_mid_training_then_resume_equals_uninterrupted(weights, tmp_path, algorithm, uninterrupted):
    """kill -9 inside the run, then ``--resume``: the same LoRA as an uninterrupted run, bitwise (for NFT its
    EMA old policy too, which a decay of 0.5 makes part of the state)."""
    full, killed = uninterrupted(algorithm), tmp_path / "killed"
    extra = _kill_run(algorithm)
    _kill_after(weights, killed, extra, 2)
    assert (killed / "checkpoints" / "iter_000002").exists()
    # the kill landed mid-training: the run had not reached its last iteration
    assert not (killed / "checkpoints" / "iter_000004").exists() and not (killed / "lora").exists()
    _resume(weights, killed, extra)
    _same_lora(full, killed)
    if algorithm == "nft":
        ea = load_file(str(full / "checkpoints" / "iter_000004" / "update.safetensors"))
        eb = load_file(str(killed / "checkpoints" / "iter_000004" / "update.safetensors"))
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_checkpoints_total_limit_keeps_the_newest_and_a_killed_run_resumes(weights, tmp_path, uninterrupted):
    """``train.checkpoints_total_limit=2`` with a checkpoint every iteration, kill -9 once the third is
    written, ``--resume``: bitwise the uninterrupted run (which kept all four), the newest two left, the
    exported LoRA beside them."""
    killed = tmp_path / "killed"
    extra = [*_kill_run("flow_grpo"), "train.checkpoints_total_limit=2"]
    _kill_after(weights, killed, extra, 3)
    assert not (killed / "checkpoints" / "iter_000004").exists() and not (killed / "lora").exists()
    _resume(weights, killed, extra)
    full = uninterrupted("flow_grpo")
    _same_lora(full, killed)
    assert sorted(p.name for p in (full / "checkpoints").iterdir())[:4] == [
        f"iter_00000{i}" for i in range(1, 5)
    ]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "iter_000003",
        "iter_000004",
        "latest",
    ]


@pytest.mark.parametrize(
    "override,field",
    [
        ("grpo.rho=0", "grpo.rho"),
        ("grpo.rho=1.5", "grpo.rho"),
        ("reward.self_confidence.num_probes=3", "reward.self_confidence.num_probes"),
        ("reward.self_confidence.delta=0", "reward.self_confidence.delta"),
        ("sampling.group_size=1", "sampling.group_size"),
        ("grpo.kl_form=wrong", "grpo.kl_form"),
        ("sampling.cfg_scale=abc", "sampling.cfg_scale"),
        ("grpo.not_a_field=1", "grpo.not_a_field"),
        ("data.train_prompts=/no/such/file.txt", "data.train_prompts"),
        ("reward.self_confidence.timesteps=99", "reward.self_confidence.timesteps"),
        ("grpo.train_steps=10", "grpo.train_steps"),
        ("grpo.train_steps=a,b", "grpo.train_steps"),
        ("train.max_minutes=-1", "train.max_minutes"),
        # AdamW's bounds: eps 0 divides by zero, betas outside [0, 1), a negative decay grows weights
        ("optim.eps=0", "optim.eps"),
        ("optim.beta1=1.5", "optim.beta1"),
        ("optim.beta2=1", "optim.beta2"),
        ("optim.beta1=-0.1", "optim.beta1"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("train.process_group_timeout_minutes=0", "train.process_group_timeout_minutes"),
        ("train.checkpoints_total_limit=-1", "train.checkpoints_total_limit"),
        ("train.mixed_precision=fp16", "train.mixed_precision"),
    ],
)
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("toy", [override])
    assert str(e.value).startswith(field)


def test_presets_validate_and_inherit():
    names = [
        "toy",
        "toy_verifiable",
        "toy_mixed",
        "toy_released_code",
        "toy_contrastive",
        "sd35m",
        "flux",
        "ablation/k4",
        "ablation/k8",
        "ablation/k16",
        "ablation/cfg_in_reward",
        "ablation/offline",
        "ablation/rho1",
        "ablation/no_cfg",
    ]
    cfgs = {n: load_config(n, check_paths=False) for n in names}
    sd = cfgs["sd35m"]
    assert (
        sd.sampling.group_size,
        sd.reward.self_confidence.num_probes,
        sd.sampling.num_steps,
        sd.eval.num_steps,
        sd.sampling.cfg_scale,
        sd.grpo.rho,
        sd.model.lora.rank,
        sd.model.lora.alpha,
        sd.optim.lr,
        sd.grpo.beta,
        sd.model.resolution,
    ) == (16, 8, 10, 40, 7.0, 0.6, 32, 64, 3e-4, 0.04, 512)
    assert cfgs["ablation/k4"].reward.self_confidence.num_probes == 4
    assert cfgs["ablation/rho1"].grpo.rho == 1.0 and cfgs["ablation/no_cfg"].sampling.cfg_scale == 1.0
    rc = cfgs["toy_released_code"].reward.self_confidence
    assert (rc.standardize, rc.weighting, rc.probe_mode, rc.timesteps) == (
        True,
        "t(1-t)",
        "per_sample_timestep",
        "released_sd3",
    )
    assert cfgs["toy_released_code"].grpo.train_steps == "released_sd3"  # steps 4..8 of 10, as released
    assert cfgs["flux"].sampling.cfg_scale == 1.0 and cfgs["flux"].sampling.group_size == 16
    assert cfgs["toy_verifiable"].reward.components[0].name == "toy_geneval"


def test_a_yaml_boolean_word_given_to_a_string_field_is_that_string():
    """`model.offload_text_encoders=off` on the command line is the choice "off" (YAML alone reads False and
    the field rejected it); a boolean field still reads booleans."""
    cfg = load_config("sd35m", ["model.offload_text_encoders=off", "train.report=false"], check_paths=False)
    assert cfg.model.offload_text_encoders == "off" and cfg.train.report is False
