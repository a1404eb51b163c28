"""Evaluations and image grids split over processes (``solace/evaluation/sharding.py``), here on threads
standing in for processes (their gathers meet at a barrier), against one process. The multi-process runs:
tests/test_ddp_runs.py (DDP) and tests/test_fsdp_training.py (FSDP, padded blocks)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from solace.evaluation.sharding import Shards, split

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import make_tiny_toy_weights  # noqa: E402


def test_split_gives_contiguous_blocks_in_rank_order_padded_to_equal_lengths():
    for world in (1, 2, 3, 4):
        for n in range(0, 11):
            blocks = [split(n, r, world) for r in range(world)]
            assert [i for mine, real in blocks for i in mine[:real]] == list(range(n))
            assert all(len(mine) == real for mine, real in blocks)  # no padding unless asked
            assert n == 0 or blocks[0][1] > 0  # the main process always has samples
            padded = [split(n, r, world, pad=True) for r in range(world)]
            assert {len(mine) for mine, _ in padded} == {-(-n // world)}  # equal: every forward a collective
            for (mine, real), (own, _) in zip(padded, blocks, strict=True):
                assert mine[:real] == own and set(mine[real:]) <= {own[-1] if own else 0}
    with pytest.raises(ValueError):
        split(4, 2, 2)


def test_gather_refuses_a_block_left_out():
    lone = Shards(rank=0, world=2, gather_fn=lambda pairs: pairs)  # as if the other process sent nothing
    with pytest.raises(RuntimeError, match="gathered 1 of 2 samples"):
        lone.gather([(0, "a")], 2)
    assert Shards().gather([(1, "b"), (0, "a")], 2) == ["a", "b"]


class Threads:
    """``world`` threads as processes: gather and broadcast meet at a barrier."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world, timeout=120), {}

    def shards(self, rank: int, pad: bool = False) -> Shards:
        def gather(pairs):
            self.slots[rank] = list(pairs)
            self.barrier.wait()
            out = [x for r in range(self.world) for x in self.slots[r]]
            self.barrier.wait()
            return out

        def broadcast(objs):
            if rank == 0:
                self.slots["from_main"] = list(objs)
            self.barrier.wait()
            out = list(self.slots["from_main"])
            self.barrier.wait()
            return out

        return Shards(rank, self.world, pad, gather, broadcast)

    def run(self, fn, pad: bool = False) -> list:
        """``fn(shards)`` on every rank at once; their results (or the first error)."""
        results, errors = [None] * self.world, []

        def one(r):
            try:
                results[r] = fn(self.shards(r, pad))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from solace.toy.adapter import ToyAdapter

    torch.set_num_threads(1)
    return ToyAdapter(weights=make_tiny_toy_weights(tmp_path_factory.mktemp("shard") / "tiny.safetensors"))


class CountForwards:
    """Counts each thread's velocity forwards (under FSDP each is a collective); ``count`` resets."""

    def __init__(self, adapter):
        self.adapter, self.local, self.velocity = adapter, threading.local(), adapter.velocity

    def __enter__(self):
        def counted(*a, **k):
            self.local.n = getattr(self.local, "n", 0) + 1
            return self.velocity(*a, **k)

        self.adapter.velocity = counted
        return self

    def __exit__(self, *exc):
        self.adapter.velocity = self.velocity

    def count(self) -> int:
        n, self.local.n = getattr(self.local, "n", 0), 0
        return n


def test_sharded_toy_evaluation_and_grid_equal_one_process(adapter):
    from solace.sampling.generate import generate_shared
    from solace.toy.evaluate import evaluate_records
    from solace.toy.world import balanced_subset, load_heldout

    recs = balanced_subset(load_heldout(), 5)
    kw = dict(samples_per_prompt=2, num_steps=2, cfg_scale=3.0, seed=4, batch_size=2, progress=False)
    alone = evaluate_records(adapter, recs, **kw)
    doc = json.dumps(alone, sort_keys=True, default=str)

    def evaluate(sh):
        res = evaluate_records(adapter, recs, shards=sh, **kw)
        return res, sh.sampled["eval"], counter.count()

    with CountForwards(adapter) as counter:
        for pad in (False, True):
            runs = Threads(3).run(evaluate, pad=pad)
            assert all(json.dumps(r, sort_keys=True, default=str) == doc for r, _, _ in runs)
            assert [n for _, n, _ in runs] == [4, 4, 2]  # 10 samples: blocks of 4, 4 and 2
            forwards = [f for _, _, f in runs]
            # padded, every process runs as many forwards (under FSDP each is a collective); must fail
            # unpadded: 2 batches of 2 samples, 2 steps each, against 1 batch
            assert (forwards == [4, 4, 4]) if pad else (forwards == [4, 4, 2])
    prompts = [r.prompt for r in recs[:3]]
    one = generate_shared(adapter, prompts, 4, 2, 3.0, Shards(), seed=9)
    two = Threads(3).run(
        lambda sh: (generate_shared(adapter, prompts, 4, 2, 3.0, sh, seed=9), sh.sampled["grid"])
    )
    assert [n for _, n in two] == [4, 4, 4]
    for images, _ in two:
        assert len(images) == 12 and all(
            np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(images, one, strict=True)
        )


def test_sharded_metric_evaluation_equals_one_process(adapter):
    from solace.evaluation.evaluators import eval_suite
    from solace.evaluation.metrics_eval import generate_and_score

    suite = eval_suite("toy_heldout", 3)

    def brightness(images, prompts, metas):
        return images.float().mean((1, 2, 3)) + torch.tensor([len(p) for p in prompts]).float()

    kw = dict(
        samples_per_prompt=2, num_steps=2, cfg_scale=3.0, seed=5, batch_size=4, grid_rows=2, progress=False
    )
    alone = generate_and_score(adapter, suite, {"b": brightness}, "base", None, **kw)
    runs = Threads(2).run(lambda sh: generate_and_score(adapter, suite, {"b": brightness}, "base", None,
                                                          shards=sh, **kw))  # fmt: skip
    for res in runs:
        # one 8-bit level in a pixel moves the mean brightness by 1 / (255 * 3 * 32 * 32)
        torch.testing.assert_close(res["scores"]["b"], alone["scores"]["b"], rtol=0, atol=1e-5)
        assert res["thumbs"].keys() == alone["thumbs"].keys() == {0, 1}
        assert res["image_size"] == alone["image_size"]


def test_the_cached_base_is_the_main_process_decision(adapter, tmp_path):
    """Only the main process reads the base-evaluation cache and tells the others: a process that read it
    itself (here it cannot: its path does not exist) would sample alone while the others skip."""
    from solace.evaluation.cache import BaseEvalCache
    from solace.toy.evaluate import ToyEvaluator
    from solace.toy.world import balanced_subset, load_heldout

    recs = balanced_subset(load_heldout(), 3)
    kw = dict(samples=1, steps=2, cfg_scale=3.0, seed=1)
    cached = {"summary": {"overall": {"strict": 0.5, "lenient": 0.75}, "categories": {}}, "per_prompt": []}
    BaseEvalCache(tmp_path / "cache.json", {"k": 1}).put(cached)

    def evaluate(sh):
        cache = BaseEvalCache(
            tmp_path / ("cache.json" if sh.is_main else "elsewhere.json"), {"k": 1}, sh.is_main
        )
        rec = ToyEvaluator(adapter, recs, "toy", cache=cache, shards=sh, **kw).evaluate(0)
        return rec, sh.sampled["eval"], cache.get()

    (r0, n0, own0), (r1, n1, own1) = Threads(2).run(evaluate)
    assert r0 == r1 and r0["strict"] == 0.5 and n0 == n1 == 0  # nobody sampled
    assert own0 is not None and own1 is None  # must fail if each process decided for itself
