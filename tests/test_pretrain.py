"""`solace toy pretrain`: reproducible from its seed, resumable, continuable from another run (--init)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from solace.errors import ConfigError
from solace.toy.adapter import load_toy_net
from solace.toy.pretrain import PretrainConfig, pretrain

TINY = dict(batch_size=4, dataset_size=16, threads=1, eval_every=1000, channels=(16, 16, 32), warmup=1)


def _cfg(out, **kw) -> PretrainConfig:
    return PretrainConfig(out=str(out), **{**TINY, **kw})


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_same_seed_same_weights_and_resume_matches(tmp_path):
    a = pretrain(_cfg(tmp_path / "a", steps=4, checkpoint_every=2))
    b = pretrain(_cfg(tmp_path / "b", steps=4, checkpoint_every=2))
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    net = load_toy_net(a)  # the written file loads through the adapter's loader
    assert net.config["channels"] == [16, 16, 32]
    meta = json.loads((tmp_path / "a" / "checkpoint_state.json").read_text())
    assert meta["step"] == 4

    # stopped after 2 steps, then resumed to 4: the same weights as the uninterrupted run
    pretrain(_cfg(tmp_path / "c", steps=2, checkpoint_every=2))
    c = pretrain(_cfg(tmp_path / "c", steps=4, checkpoint_every=2), resume=True)
    wc = _weights(c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    other = _weights(pretrain(_cfg(tmp_path / "d", steps=4, checkpoint_every=2, seed=1)))
    assert any(not torch.equal(wa[k], other[k]) for k in wa)


def test_init_continues_from_another_runs_checkpoint(tmp_path):
    pretrain(_cfg(tmp_path / "a", steps=3, checkpoint_every=3))
    src = load_file(str(tmp_path / "a" / "checkpoint.safetensors"))
    # a continuation with a vanishing learning rate keeps the source's weights (and its EMA)
    out = pretrain(
        _cfg(tmp_path / "b", steps=1, lr=1e-12, seed=1, init=str(tmp_path / "a" / "checkpoint.safetensors"))
    )
    cont = load_file(str(tmp_path / "b" / "checkpoint.safetensors"))
    for k, v in src.items():
        if k.startswith("net."):
            assert torch.allclose(cont[k], v, atol=1e-6), k
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["init_from_seed"] == "0" and meta["init_from_steps"] == "3" and meta["total_steps"] == "4"
    fresh = load_file(str(pretrain(_cfg(tmp_path / "c", steps=1, lr=1e-12, seed=1))))
    final = load_file(str(out))
    assert any(not torch.equal(final[k], fresh[k]) for k in final)


def test_init_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="init"):
        pretrain(_cfg(tmp_path / "x", steps=1, init=str(tmp_path / "missing.safetensors")))
    pretrain(_cfg(tmp_path / "a", steps=1, checkpoint_every=1))
    with pytest.raises(ConfigError, match="init.*architecture"):
        pretrain(
            _cfg(
                tmp_path / "y",
                steps=1,
                channels=(16, 32, 32),
                init=str(tmp_path / "a" / "checkpoint.safetensors"),
            )
        )


def test_a_folder_holding_a_pretraining_run_is_never_silently_replaced(tmp_path, capsys):
    first = pretrain(_cfg(tmp_path / "a", steps=2, checkpoint_every=2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="--resume.*--overwrite") as e:
        pretrain(_cfg(tmp_path / "a", steps=1, seed=1))
    assert e.value.field == "--out" and "toy_base.safetensors" in str(e.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == before
    again = pretrain(_cfg(tmp_path / "a", steps=1, seed=1), overwrite=True)
    assert again == first and "--overwrite: removed the earlier run's" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "checkpoint_state.json").read_text())["step"] == 1
