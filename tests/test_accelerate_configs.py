"""The accelerate launch configs of configs/accelerate/ (FSDP for SD3 and FLUX, DeepSpeed ZeRO-2): they load
through accelerate's own config schema and name block classes that exist in the diffusers transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from solace.models.sd3 import SD3_LORA_TARGETS

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipelines import make_tiny_flux, make_tiny_sd3  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _accelerate_config(name: str):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = ROOT / "configs" / "accelerate" / name
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    return cfg, yaml.safe_load(path.read_text())


@pytest.mark.parametrize(
    ("name", "pipe", "blocks"),
    [
        ("fsdp_sd3.yaml", make_tiny_sd3, ["JointTransformerBlock"]),
        ("fsdp_flux.yaml", make_tiny_flux, ["FluxTransformerBlock", "FluxSingleTransformerBlock"]),
    ],
)
def test_fsdp_configs_wrap_the_diffusers_blocks_lora_aware(name, pipe, blocks):
    from accelerate.utils.dataclasses import get_module_class_from_name

    from solace.models.lora import add_lora, lora_parameters

    cfg, raw = _accelerate_config(name)
    assert str(cfg.distributed_type) in ("DistributedType.FSDP", "FSDP")
    assert cfg.mixed_precision == "bf16"  # FSDP's bf16 mixed precision (solace/trainer/fsdp.py)
    f = cfg.fsdp_config
    assert f["fsdp_use_orig_params"] is True and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_transformer_layer_cls_to_wrap"].split(",") == blocks
    transformer = pipe(0).transformer
    assert list(transformer._no_split_modules) == blocks  # diffusers' own block classes
    transformer.requires_grad_(False)  # as the trainer does before adding LoRA
    add_lora(transformer, 4, 8, SD3_LORA_TARGETS)
    for b in blocks:  # accelerate finds each class in the LoRA-carrying transformer
        assert get_module_class_from_name(transformer, b) is not None
    trainable = {id(p) for p in transformer.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(transformer)}  # only LoRA trains


def test_deepspeed_zero2_config_loads():
    cfg, raw = _accelerate_config("deepspeed_zero2.yaml")
    assert str(cfg.distributed_type) in ("DistributedType.DEEPSPEED", "DEEPSPEED")
    assert cfg.deepspeed_config["zero_stage"] == 2
    assert (
        "deepspeed" not in (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]
    )


def test_fsdp_config_wrapping_gives_the_one_process_lora_gradients_on_two_cpu_processes(tmp_path):
    """accelerate refuses FSDP without a GPU ("There are currently no available devices found, must be one of
    'XPU', 'CUDA', ..."), so the configs' wrapping (their block classes as units, use_orig_params, FULL_SHARD,
    frozen base + LoRA) runs with torch's FSDP directly on 2 gloo processes (tests/run_fsdp_wrap.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    subprocess.run([*cmd, str(HERE / "run_fsdp_wrap.py"), str(tmp_path)], check=True, env=env, timeout=600)
    for r in (0, 1):
        doc = json.loads((tmp_path / f"fsdp_rank{r}.json").read_text())
        assert doc["world"] == 2
        for kind in ("sd3", "flux"):
            res = doc[kind]
            assert res["units"] == res["expected_units"] == 2  # each transformer block one FSDP unit
            assert res["lora_with_grad"] == res["lora"] > 0 and res["trainable_not_lora"] == 0
            assert res["max_err"] <= 1e-6 * max(res["max_ref"], 1e-3)  # measured 3.7e-9 (sd3), 5.8e-10 (flux)


def test_trainer_refuses_deepspeed_and_drives_fsdp():
    """FSDP runs through solace/trainer/fsdp.py (tests/test_fsdp_training.py); DeepSpeed is refused."""
    from accelerate.utils import DistributedType

    from solace.errors import ConfigError
    from solace.trainer.distributed import check_backend

    refused = r"accelerate config: distributed_type DEEPSPEED .*--multi_gpu.*FSDP"
    with pytest.raises(ConfigError, match=refused):
        check_backend(DistributedType.DEEPSPEED)
    for ok in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP"):
        check_backend(DistributedType[ok])
