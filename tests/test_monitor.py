"""The collapse monitor by hand: thresholds against the first iteration, reward spikes, and the evaluation
images compared with the base model's on the same prompts and noise."""

from __future__ import annotations

import torch

from solace.trainer.monitor import CollapseMonitor, eval_stats, latent_texture


def test_batch_statistics_compare_window_means():
    m = CollapseMonitor(std_drop=0.5, foreground_drop=0.5, window=2)
    # one low iteration (a single-object prompt) does not trip: the windows are not full and apart yet
    assert m.update(0, {"texture": 1.0, "foreground": 0.2}) == []
    assert m.update(1, {"texture": 1.0, "foreground": 0.05}) == []
    assert m.update(2, {"texture": 0.6, "foreground": 0.2}) == []
    # iterations 2-3 against 0-1: texture mean 0.6 / 1.0 (no), foreground 0.1 / 0.125 (no)
    assert m.update(3, {"texture": 0.6, "foreground": 0.0}) == []
    w = m.update(4, {"texture": 0.3, "foreground": 0.01})  # last two: texture 0.45, foreground 0.005
    assert len(w) == 2 and "texture fell to 0.4500 (mean of the last 2 iterations, 45% of the first 2" in w[0]
    assert "foreground fell to 0.0050" in w[1]
    assert m.verdict == "TRIPPED (2 warnings: foreground, texture)"


def test_reward_spike_needs_five_iterations_of_history():
    m = CollapseMonitor(reward_spike_z=6.0)
    for i, r in enumerate([1.0, 1.1, 0.9, 1.0, 1.1]):
        assert m.update(i, {"reward_mean": r}) == []
    assert m.update(5, {"reward_mean": 1.2}) == []  # 2.7 running stds: fine
    (w,) = m.update(6, {"reward_mean": 2.0})
    assert "jumped" in w and m.verdict.startswith("TRIPPED (1 warnings: reward)")


def test_evaluation_images_against_the_base():
    m = CollapseMonitor(std_drop=0.5, foreground_drop=0.5)
    base = {"foreground": 0.2, "objects": 1.5, "pixel_std": 0.1}
    assert m.update_eval(10, base, {"foreground": 0.15, "pixel_std": 0.08}) == []
    assert m.update_eval(10, {}, {"foreground": 0.0}) == []  # no base statistics: nothing to compare
    w = m.update_eval(20, base, {"foreground": 0.05, "objects": 0.2, "pixel_std": 0.04})
    assert len(w) == 2 and "eval_foreground fell to 0.0500 (25% of the base model's 0.2000" in w[0]
    assert m.verdict == "TRIPPED (2 warnings: eval_foreground, eval_pixel_std)"
    assert m.update(0, {"texture": 1.0}) == [] and len(m.warnings) == 2  # batch windows not yet full


def test_latent_texture_is_the_spatial_std():
    z = torch.zeros(2, 3, 4, 4)
    z[1, :, :2] = 1.0  # half of the 16 pixels 1: every deviation 0.5, unbiased std = sqrt(16 * 0.25 / 15)
    t = latent_texture(z)
    assert t[0] == 0 and torch.isclose(t[1], torch.tensor((16 * 0.25 / 15) ** 0.5))


def test_report_signal_table_compares_window_means():
    """The report's training signals are means over the first and last ``monitor.window`` iterations (one
    batch swings with its prompts), NaN where a signal was never logged."""
    from solace.trainer.report import _signal_table, window_means

    hist = [{"iteration": i + 1, "reward/mean": float(i)} for i in range(10)]
    hist[9]["train/kl"] = 0.5
    assert window_means(hist, "reward/mean", 3) == (1.0, 8.0)
    a, b = window_means(hist, "train/kl", 3)
    assert a != a and b == 0.5  # NaN: never logged in the first window
    table = _signal_table(hist, 3)
    assert "| | iterations 1-3 | iterations 8-10 |" in table
    assert "| reward/mean | 1.0000 | 8.0000 |" in table
    assert _signal_table(hist[:3], 5)[4] == "| | iterations 1-1 | iterations 3-3 |"  # window > half the run


def test_standardised_reward_rounding_is_no_spike():
    """A reward standardised across the batch has a mean of 0 up to rounding (~1e-7), and such a wobble was
    once reported as a jump of 6 running stds (released-code form, seed 1). The floor (a thousandth of the
    batch's reward std) keeps rounding quiet and still sees a real jump."""
    means = [3.9e-7, 1.3e-7, -2.0e-7, 0.5e-7, -1.1e-7]
    m = CollapseMonitor(reward_spike_z=6.0)
    for i, r in enumerate(means):
        assert m.update(i, {"reward_mean": r, "reward_std": 1.0}) == []
    assert m.update(5, {"reward_mean": 1.5e-6, "reward_std": 1.0}) == []
    # the same history without the batch spread is judged by the running std alone: a "jump"
    bare = CollapseMonitor(reward_spike_z=6.0)
    for i, r in enumerate(means):
        bare.update(i, {"reward_mean": r})
    assert len(bare.update(5, {"reward_mean": 1.5e-6})) == 1
    # a real jump of the mean (here 0.5 of the batch spread) still trips with the floor in place
    (w,) = m.update(6, {"reward_mean": 0.5, "reward_std": 1.0})
    assert "jumped" in w


def test_evaluation_accuracy_against_the_base():
    """The prompt-contrastive form with NFT grew the foreground while strict accuracy fell from 0.59 to 0.13:
    the image rules stay quiet, the accuracy rule (below 0.75 of the base's) speaks."""
    m = CollapseMonitor(accuracy_drop=0.75)
    base = eval_stats({"strict": 0.589, "images": {"foreground": 0.15, "pixel_std": 0.14}})
    assert base == {"foreground": 0.15, "pixel_std": 0.14, "strict": 0.589}
    assert (
        m.update_eval(30, base, eval_stats({"strict": 0.480, "images": {"foreground": 0.15}})) == []
    )  # 81 %
    (w,) = m.update_eval(
        60, base, eval_stats({"strict": 0.131, "images": {"foreground": 0.24, "pixel_std": 0.1}})
    )
    assert "eval_strict fell to 0.1310 (22% of the base model's 0.5890" in w and "prompts drawn worse" in w
    assert m.verdict == "TRIPPED (1 warnings: eval_strict)"
    assert (
        eval_stats({"strict": None, "images": {}}) == {}
    )  # an evaluator without accuracy: nothing to compare
