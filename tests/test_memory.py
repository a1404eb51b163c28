"""Memory switches of the SD3 / FLUX adapters (issue 16, item 2): prompt embeddings on disk (safetensors,
keyed by the encoders' identity and the prompt), text encoders offloaded or freed, the bounded in-memory LRU,
the empty prompt broadcast instead of copied, VAE slicing / tiling, and the accelerate configs."""

from __future__ import annotations

import gc
import json
import pickle
import sys
import weakref
from pathlib import Path

import pytest
import torch

from solace.errors import ConfigError
from solace.models.base import Conditioning
from solace.models.flux import FluxAdapter
from solace.models.sd3 import SD3Adapter
from solace.models.text_cache import ConditioningLRU, EmbeddingStore
from solace.trainer.config import load_config
from solace.utils.files import safetensors_problem

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipelines import (  # noqa: E402
    TINY_RESOLUTION,
    TINY_T5_MAX_LEN,
    make_tiny_flux,
    make_tiny_sd3,
    save_tiny_pipeline,
    train_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares", "a cat left of a dog"]


def _adapter(kind: str, pipe=None, **kw):
    if kind == "flux":
        return FluxAdapter(
            pipe or make_tiny_flux(0), resolution=TINY_RESOLUTION, max_sequence_length=16, **kw
        )
    return SD3Adapter(pipe or make_tiny_sd3(0), resolution=TINY_RESOLUTION, max_sequence_length=16, **kw)


def _assert_same(a: Conditioning, b: Conditioning) -> None:
    """Bitwise equal tensors, dtypes and shared tensors."""
    assert a.tensors.keys() == b.tensors.keys() and a.shared.keys() == b.shared.keys()
    pairs = [(a.tensors[k], b.tensors[k]) for k in a.tensors] + [(a.shared[k], b.shared[k]) for k in a.shared]
    for x, y in pairs:
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu())


def _one_by_one(adapter, prompts: list[str]) -> Conditioning:
    """Each prompt encoded alone, as the trainer and the cache do (a batched encoding can differ from it in
    the last bits: measured here)."""
    return Conditioning.cat([adapter.encode_prompts([p]) for p in prompts])


def _no_encoding(adapter) -> None:
    """Make any call of the pipeline's own text encoding fail (what is read must come from disk)."""

    def refuse(*a, **k):
        raise AssertionError("the text encoders were called")

    adapter.pipeline.encode_prompt = refuse


# ------------------------------------------------------------------ disk cache


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_disk_cache_gives_exactly_the_fresh_embeddings(kind, tmp_path):
    pipe = make_tiny_sd3(0) if kind == "sd3" else make_tiny_flux(0)
    plain = _adapter(kind, pipe)
    fresh = [plain.encode_prompts([p]) for p in ["", *PROMPTS]]
    writer = _adapter(kind, pipe, embedding_cache=str(tmp_path))
    _assert_same(writer.encode_prompts(["", *PROMPTS]), Conditioning.cat(fresh))
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 4 and all(safetensors_problem(f) is None for f in files)
    assert json.loads((writer.text.store.root / "identity.json").read_text())["family"] == kind

    reader = _adapter(
        kind, make_tiny_sd3(0) if kind == "sd3" else make_tiny_flux(0), embedding_cache=str(tmp_path)
    )
    assert reader.text.store.root == writer.text.store.root  # the same encoders give the same key
    _no_encoding(reader)
    for p, f in zip(["", *PROMPTS], fresh, strict=True):
        _assert_same(reader.encode_prompts([p]), f)
    _assert_same(reader.encode_prompts(PROMPTS[::-1]), Conditioning.cat(fresh[1:][::-1]))


def test_cache_key_follows_encoders_and_settings(tmp_path):
    def key(pipe, L=16):
        return SD3Adapter(
            pipe, resolution=TINY_RESOLUTION, max_sequence_length=L, embedding_cache=str(tmp_path)
        ).text.store.key

    base = key(make_tiny_sd3(0))
    assert key(make_tiny_sd3(0)) == base
    assert key(make_tiny_sd3(0), L=8) != base  # max_sequence_length
    assert key(make_tiny_sd3(0, with_t5=False)) != base  # no T5
    assert key(make_tiny_sd3(1)) != base  # other weights
    pipe = make_tiny_sd3(0)
    with torch.no_grad():
        pipe.text_encoder_2.text_model.final_layer_norm.weight.add_(1e-3)  # one tensor of one encoder
    assert key(pipe) != base


def test_corrupt_or_pickled_cache_file_is_recomputed_and_nothing_is_unpickled(tmp_path):
    plain = _adapter("sd3")
    fresh = plain.encode_prompts([PROMPTS[0]])
    a = _adapter("sd3", plain.pipeline, embedding_cache=str(tmp_path))
    path = a.text.store.path(PROMPTS[0])
    path.parent.mkdir(parents=True)
    marker = tmp_path / "unpickled"

    class Bomb:  # unpickling it would create `marker`
        def __reduce__(self):
            return (Path.touch, (marker,))

    for payload in (pickle.dumps(Bomb()), b"\x00\x01garbage", b""):
        path.write_bytes(payload)
        with pytest.warns(UserWarning, match=r"recomputed and rewritten"):
            got = a.encode_prompts([PROMPTS[0]])
        _assert_same(got, fresh)
        assert not marker.exists() and safetensors_problem(path) is None

    # a valid safetensors file holding another prompt's embedding is corrupt too
    other = a.text.store.path(PROMPTS[1])
    a.encode_prompts([PROMPTS[1]])
    path.write_bytes(other.read_bytes())
    with pytest.warns(UserWarning, match=r"metadata \['prompt'\]"):
        _assert_same(a.encode_prompts([PROMPTS[0]]), fresh)


def test_freed_encoders_read_the_disk_cache_and_name_what_is_missing_or_corrupt(tmp_path):
    pipe = make_tiny_sd3(0)
    fresh = _one_by_one(_adapter("sd3", pipe), PROMPTS[:2])
    a = _adapter("sd3", pipe, embedding_cache=str(tmp_path))
    a.encode_prompts(PROMPTS[:2])
    refs = [weakref.ref(m) for m in a.text.modules().values()]
    assert len(refs) == 3
    a.offload_text_encoders("free")
    gc.collect()
    assert all(r() is None for r in refs)  # nothing holds the encoders any more: their memory is released
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    _assert_same(a.encode_prompts(PROMPTS[:2]), fresh)
    with pytest.raises(ConfigError, match=r"model\.offload_text_encoders.*a cat left of a dog.*solace embed"):
        a.encode_prompts([PROMPTS[2]])
    a.text.store.path(PROMPTS[0]).write_bytes(b"broken")
    with pytest.raises(ConfigError, match=r"model\.embedding_cache: embedding cache file .*truncated"):
        a.encode_prompts([PROMPTS[0]])


def test_offload_to_cpu_brings_the_encoders_back_for_a_miss_only(tmp_path):
    """On a CPU machine the compute device is the CPU too, so the moves are recorded instead of seen."""
    pipe = make_tiny_sd3(0)
    fresh = _one_by_one(_adapter("sd3", pipe), PROMPTS)
    a = _adapter("sd3", pipe, embedding_cache=str(tmp_path))
    a.encode_prompts(PROMPTS[:1])
    moves: list[str] = []
    for name, m in a.text.modules().items():
        to = m.to
        m.to = lambda dev, _to=to, _n=name: (moves.append(f"{_n}->{torch.device(dev).type}"), _to(dev))[1]
    a.offload_text_encoders("cpu")
    assert a.text.placement == "cpu" and len(moves) == 3
    assert all(p.device.type == "cpu" for m in a.text.modules().values() for p in m.parameters())
    moves.clear()
    _assert_same(a.encode_prompts(PROMPTS[:1]), fresh.index([0]))  # a hit: nothing moves
    assert moves == []
    _assert_same(a.encode_prompts(PROMPTS), fresh)  # two misses: in once, out once
    assert len(moves) == 6 and moves[:3] == [f"{n}->cpu" for n in a.text.modules()]


def test_store_rejects_a_file_as_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="model.embedding_cache"):
        EmbeddingStore(f, {"a": 1})


# ------------------------------------------------------------------ LRU and the empty prompt


def test_lru_is_bounded_and_evicts_the_least_recently_used():
    calls: list[str] = []

    def encode(ps):
        calls.append(ps[0])
        return Conditioning({"x": torch.full((1, 2), float(len(calls)))})

    lru = ConditioningLRU(2)
    lru(["a", "b"], encode)
    lru(["a"], encode)  # a is now the most recent
    out = lru(["c"], encode)  # evicts b
    assert len(lru) == 2 and "b" not in lru and "a" in lru and "c" in lru
    assert calls == ["a", "b", "c"] and out.tensors["x"].shape == (1, 2)
    lru(["a", "b"], encode)
    assert calls == ["a", "b", "c", "b"]
    big = lru(["p", "q", "r"], encode)  # more prompts in one call than fit: every row still returned
    assert len(big) == 3 and len(lru) == 2
    with pytest.raises(ConfigError, match="model.embedding_lru_size"):
        ConditioningLRU(0)


def test_lru_keeps_its_rows_on_its_device_the_cpu_by_default(tmp_path):
    from trainer_helpers import make_tiny_toy_weights, tiny_overrides

    from solace.trainer.trainer import Trainer

    def encode(ps):
        return Conditioning({"x": torch.ones(1, 2)}, {"ids": torch.zeros(3)})

    assert ConditioningLRU(2).device == torch.device("cpu")
    # rows move to the LRU's device whatever the encoder's (no second device here: "meta" stands in)
    lru = ConditioningLRU(2, device="meta")
    out = lru(["a", "b"], encode)
    assert out.tensors["x"].device.type == "meta" and out.shared["ids"].device.type == "meta"
    assert lru.get("a", encode).tensors["x"].device.type == "meta"
    w = make_tiny_toy_weights(tmp_path / "w.safetensors")
    tr = Trainer(load_config("toy", tiny_overrides(w, tmp_path / "run")))
    assert tr._cond_cache.device == torch.device("cpu")
    ro = tr.sample_rollout(0)  # the batch on the compute device
    assert all(v.device == tr.acc.device for v in ro.cond.tensors.values())


def test_expand_shares_the_one_row():
    one = Conditioning({"e": torch.randn(1, 7, 5), "p": torch.randn(1, 5)}, {"ids": torch.zeros(7, 3)})
    many = one.expand(64)
    assert len(many) == 64
    for k, v in many.tensors.items():
        assert v.stride(0) == 0 and v.data_ptr() == one.tensors[k].data_ptr()
        assert torch.equal(v[63], one.tensors[k][0])
    assert many.index(slice(8, 16)).tensors["e"].data_ptr() == one.tensors["e"].data_ptr()
    with pytest.raises(ValueError):
        many.expand(2)


def test_rollout_null_is_broadcast_not_copied(tmp_path):
    from trainer_helpers import make_tiny_toy_weights, tiny_overrides

    from solace.trainer.trainer import Trainer

    w = make_tiny_toy_weights(tmp_path / "w.safetensors")
    tr = Trainer(load_config("toy", tiny_overrides(w, tmp_path / "run", **{"model.embedding_lru_size": 3})))
    assert tr._cond_cache.max_items == 3
    ro = tr.sample_rollout(0)
    assert len(ro.null) == len(ro) == 8
    for k, v in ro.null.tensors.items():
        assert (
            v.stride(0) == 0
            and v.untyped_storage().data_ptr() == tr.null.tensors[k].untyped_storage().data_ptr()
        )


# ------------------------------------------------------------------ trainer


def test_trainer_with_disk_cache_and_freed_encoders_samples_the_same(tmp_path):
    """The same rollout and rewards with embeddings from disk and the encoders freed (or, without a disk
    cache, offloaded to the CPU) as without either."""
    from solace.trainer.trainer import Trainer

    folder = save_tiny_pipeline(make_tiny_sd3(0), tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cache = tmp_path / "emb"

    def run(name, **extra):
        cfg = load_config(None, train_overrides(folder, tmp_path / name, prompts, **extra))
        tr = Trainer(cfg)
        return tr, tr.collect(0)

    plain_tr, plain = run("plain")
    memory = {
        "model.embedding_cache": str(cache),
        "model.offload_text_encoders": "free",
        "model.embedding_lru_size": 1,
    }
    tr, ro = run("memory", **memory)
    assert tr.adapter.text.placement == "freed" and tr.adapter.pipeline.text_encoder is None
    assert len(list(cache.rglob("*.safetensors"))) == len(PROMPTS) + 1  # the prompts and the empty prompt
    assert torch.equal(ro.latents, plain.latents) and torch.equal(ro.advantages, plain.advantages)
    _assert_same(ro.cond, plain.cond)
    assert len(tr._cond_cache) == 1
    assert tr.save_images(1) is not None  # image grids read their prompts from disk too

    cpu_tr, cpu_ro = run("cpu", **{"model.offload_text_encoders": "cpu"})
    assert cpu_tr.adapter.text.placement == "cpu" and cpu_tr.adapter.text.store is None
    assert len(cpu_tr._cond_cache) == len(PROMPTS) + 1  # warmed before the encoders left
    assert torch.equal(cpu_ro.latents, plain.latents) and torch.equal(cpu_ro.advantages, plain.advantages)


# ------------------------------------------------------------------ config and CLI


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.embedding_cache=x"], "model.embedding_cache"),
        (["model.offload_text_encoders=cpu"], "model.offload_text_encoders"),
        (["model.vae_tiling=true"], "model.vae_tiling"),
        (
            ["model.name=some/sd3-model", "model.family=sd3", "model.offload_text_encoders=free"],
            "model.offload_text_encoders",
        ),
        (
            ["model.name=some/sd3-model", "model.family=sd3", "model.embedding_lru_size=0"],
            "model.embedding_lru_size",
        ),
        (
            ["model.name=some/sd3-model", "model.family=sd3", "model.offload_text_encoders=gpu"],
            "model.offload_text_encoders",
        ),
    ],
)
def test_memory_settings_are_checked(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config("toy", overrides, check_paths=False)
    assert e.value.field == field


def _json_tail(output: str) -> dict:
    return json.loads(output[output.rindex('{"cache"') :])


def test_embed_command_precomputes_a_prompt_file(tmp_path):
    from typer.testing import CliRunner

    from solace.cli.main import app

    folder = save_tiny_pipeline(make_tiny_sd3(0), tmp_path / "pipe")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["embed", "--config", "toy", "--prompts", str(prompts), "--device", "cpu", f"model.name={folder}"]
    args += [
        "model.dtype=fp32",
        f"model.max_sequence_length={TINY_T5_MAX_LEN}",
        f"model.resolution={TINY_RESOLUTION}",
    ]
    first = CliRunner().invoke(app, [*args, f"model.embedding_cache={tmp_path / 'emb'}"])
    assert first.exit_code == 0, first.output
    doc = _json_tail(first.output)
    assert doc["prompts"] == 4 and doc["computed"] == 4 and doc["cached"] == 0
    again = _json_tail(CliRunner().invoke(app, [*args, f"model.embedding_cache={tmp_path / 'emb'}"]).output)
    assert again["computed"] == 0 and again["cached"] == 4
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "model.embedding_cache" in missing.output


# ------------------------------------------------------------------ VAE slicing / tiling


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_vae_slicing_decodes_as_without(kind):
    plain = _adapter(kind)
    sliced = _adapter(kind, vae_slicing=True)  # a second pipeline with the same weights
    z = torch.randn(3, *plain.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert sliced.vae.use_slicing and not plain.vae.use_slicing
    torch.testing.assert_close(sliced.decode(z), plain.decode(z), rtol=0, atol=1e-5)  # measured 1.3e-6


def test_vae_tiling_is_exact_within_one_tile_and_close_above():
    """diffusers' tiles are ``vae.config.sample_size`` pixels (SD3 / FLUX VAEs: 1024, so tiling changes
    nothing at 512 px); the tiny VAE's are 16 px. Above one tile the blended tiles approximate the full
    decode: mean absolute difference measured 0.079 on [0, 1] images for this random VAE (bound 0.1)."""
    for res, exact in ((TINY_RESOLUTION, True), (4 * TINY_RESOLUTION, False)):
        plain = SD3Adapter(make_tiny_sd3(0), resolution=res, max_sequence_length=16)
        tiled = SD3Adapter(make_tiny_sd3(0), resolution=res, max_sequence_length=16, vae_tiling=True)
        calls: list[int] = []

        def spy(*a, _orig=tiled.vae.tiled_decode, _calls=calls, **k):
            _calls.append(1)
            return _orig(*a, **k)

        tiled.vae.tiled_decode = spy
        z = torch.randn(2, *plain.latent_shape(), generator=torch.Generator().manual_seed(0))
        a, b = plain.decode(z), tiled.decode(z)
        assert a.shape == b.shape and bool(calls) != exact
        if exact:
            assert torch.equal(a, b)
        else:
            assert (a - b).abs().mean() < 0.1


def test_vae_switches_without_a_vae_are_config_errors():
    pipe = make_tiny_sd3(0)
    pipe.vae = None
    with pytest.raises(ConfigError, match="model.vae_slicing"):
        SD3Adapter(pipe, resolution=TINY_RESOLUTION, vae_slicing=True)
