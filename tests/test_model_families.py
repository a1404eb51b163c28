"""Model families by name (``model.family``): ``auto`` reads the pipeline's own class name (never the model's
name), an explicit family loads a fine-tune under any name, a user's own family plugs in from a module named
in ``plugins`` and trains through the CLI without a change to solace, and every failure is one line naming
``model.family`` (or ``plugins``, or the size field the family's rule refuses)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from solace.cli.main import app
from solace.errors import ConfigError
from solace.models import FAMILIES, load_adapter, model_family, resolve_family
from solace.models.base import AdapterBase, FlowModelAdapter, SizeRule
from solace.models.family import pipeline_class
from solace.trainer.config import load_config, model_family_of

ROOT = Path(__file__).resolve().parents[1]

# A third model family, written by a user outside solace: a tiny flow net over 8 x 8 RGB "latents" (pixels),
# a hashed-word text encoder, LoRA on its two projections; registered on import.
PLUGIN = """
import torch
from torch import nn

from solace.models.base import AdapterBase, Conditioning, SizeRule
from solace.models.family import FAMILIES, ModelFamily
from solace.sampling.schedule import flow_match_sigmas

SIDE, WIDTH, VOCAB = 8, 16, 97


class TinyFlowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(VOCAB, WIDTH)
        self.proj_in = nn.Linear(4, WIDTH)
        self.proj_cond = nn.Linear(WIDTH, WIDTH)
        self.proj_out = nn.Linear(WIDTH, 3)

    def forward(self, z, t, text):
        b, _, h, w = z.shape
        x = torch.cat([z.permute(0, 2, 3, 1), t.view(b, 1, 1, 1).expand(b, h, w, 1)], -1)
        x = torch.tanh(self.proj_in(x) + self.proj_cond(text)[:, None, None, :])
        return self.proj_out(x).permute(0, 3, 1, 2)


class TinyFlowAdapter(AdapterBase):
    name = "tinyflow"
    lora_target_modules = ["proj_in", "proj_out"]

    def __init__(self, device="cpu"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.denoiser = TinyFlowNet().to(device)

    @property
    def device(self):
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self):
        return torch.float32

    def latent_shape(self):
        return (3, SIDE, SIDE)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        ids = torch.tensor([[sum(map(ord, w)) % VOCAB for w in (p.split() or [""])[:6]] +
                            [0] * (6 - len((p.split() or [""])[:6])) for p in prompts])
        return Conditioning({"text": self.denoiser.words(ids.to(self.device)).mean(1)})

    def velocity(self, latents, t, cond):
        t = torch.as_tensor(t, device=latents.device, dtype=torch.float32).expand(latents.shape[0])
        return (self.forward_module or self.denoiser)(latents, t, cond.tensors["text"])

    def decode(self, latents):
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images):
        return images.float().to(self.device) * 2 - 1

    def sigmas(self, num_steps):
        return flow_match_sigmas(num_steps, 3.0)


def load(model, device="cpu", **settings):
    return TinyFlowAdapter(device)


FAMILIES.register(
    "tinyflow",
    ModelFamily(load=load, recognises=lambda name, cls: name.startswith("tinyflow:"), sizes=SizeRule(SIDE)),
)
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plugin")
    (d / "tinyflow_family.py").write_text(PLUGIN)
    return d


@pytest.fixture(scope="module")
def tinyflow(plugin_dir):
    """The plugin imported into this process (as ``plugins`` does) and registered."""
    sys.path.insert(0, str(plugin_dir))
    try:
        load_config(None, ["plugins=[tinyflow_family]"], check_paths=False)
        yield
    finally:
        sys.path.remove(str(plugin_dir))


def _env(plugin_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(ROOT)]), **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


def _index(folder: Path, cls: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls, "_diffusers_version": "0.35.0"}))
    return folder


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------ the third family, by CLI


def test_a_plugin_family_trains_through_the_cli(plugin_dir, tmp_path):
    """A family defined in a module of the user's (no solace file edited) trains end to end: ``plugins``
    imports it, ``model.family`` picks it, the run exports its LoRA and logs every iteration."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "run"
    cfg = tmp_path / "tinyflow.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        plugins: [tinyflow_family]
        model: {{name: my-own-net, family: tinyflow, lora: {{rank: 2, alpha: 4}}}}
        data: {{train_prompts: {prompts}}}
        sampling: {{group_size: 2, prompts_per_step: 2, num_steps: 3, batch_size: 4}}
        reward: {{self_confidence: {{num_probes: 2}}}}
        train: {{iterations: 2, micro_batch_size: 4, threads: 1, device: cpu, report: false,
                 checkpoint_every: 1, output_dir: {out}}}
        eval: {{every: 0, image_every: 0}}
        """)
    )
    res = subprocess.run(
        [sys.executable, "-m", "solace", "train", "--config", str(cfg)],
        env=_env(plugin_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    # must fail: the same run without the plugin does not know the family, and says so in one line
    cfg.write_text(cfg.read_text().replace("plugins: [tinyflow_family]\n", ""))
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "solace",
            "train",
            "--config",
            str(cfg),
            f"train.output_dir={tmp_path / 'r2'}",
        ],
        env=_env(plugin_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and "model.family" in err[0] and "'tinyflow'" in err[0] and "sd3" in err[0]


def test_the_plugin_family_answers_auto_and_its_size_rule(tinyflow):
    assert model_family("tinyflow:anything") == "tinyflow"
    ad = load_adapter("tinyflow:x", height=8, width=8)
    assert isinstance(ad, FlowModelAdapter) and ad.latent_shape() == (3, 8, 8)
    assert ad.image_pixels() == (8, 8)  # the protocol's defaults come from AdapterBase
    assert ad.guidance_scale is None and ad.pipeline is None and ad.fsdp_ignored_modules == []
    # must fail: the family's own size rule, through config validation and through loading
    with pytest.raises(
        ConfigError, match="^model.height: the tinyflow model draws 8 x 8 images only, got 16"
    ):
        load_config(None, ["model.name=x", "model.family=tinyflow", "model.resolution=16"], check_paths=False)
    with pytest.raises(ConfigError, match="^width: the tinyflow model draws 8 x 8"):
        load_adapter("tinyflow:x", width=32)
    # must fail: a memory switch the family does not read
    with pytest.raises(ConfigError, match=r"^model.vae_tiling: .*\(flux, sd3\), not to tinyflow"):
        load_config(
            None, ["model.name=x", "model.family=tinyflow", "model.vae_tiling=true"], check_paths=False
        )


def test_the_cli_loads_a_plugin_family_by_option(tinyflow, tmp_path):
    """``--plugin`` imports the module, ``--family`` picks its family for a name auto cannot tell."""
    args = ["sample", "--model", "my-own-net", "--family", "tinyflow", "--plugin", "tinyflow_family"]
    args += ["--prompt", "a red circle", "--seeds", "0,1", "--steps", "2", "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "grid.png")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "grid").glob("*.png"))) == 2
    # must fail: without --family auto cannot tell; an unknown --plugin module; each one line
    res = CliRunner().invoke(app, [*args[:3], *args[7:], "--out", str(tmp_path / "g2.png")])
    assert res.exit_code == 2 and "--family: auto cannot tell the family of 'my-own-net'" in res.output
    res = CliRunner().invoke(app, [*args[:5], "--plugin", "no_such_mod_x", "--out", str(tmp_path / "g3.png")])
    assert res.exit_code == 2 and "--plugin: no plugin module named 'no_such_mod_x'" in res.output


def test_plugins_are_checked_in_one_line(plugin_dir):
    with pytest.raises(ConfigError, match="^plugins: no plugin module named 'no_such_family_mod'") as e:
        load_config(None, ["plugins=[no_such_family_mod]"], check_paths=False)
    _one_line(e)
    with pytest.raises(ConfigError, match="^plugins: 'my family' is not a module name") as e:
        load_config(None, ["plugins=[my family]"], check_paths=False)
    with pytest.raises(ConfigError, match="^plugins: names a module twice"):
        load_config(None, ["plugins=[json,json]"], check_paths=False)
    assert load_config(None, ["plugins=[json]"], check_paths=False).plugins == ["json"]


# ------------------------------------------------------------------------------ auto: the pipeline's class


def test_auto_reads_the_pipeline_class_not_the_name(tiny_sd3_folder, tiny_flux_folder, tmp_path):
    assert model_family(str(tiny_sd3_folder)) == "sd3"
    assert model_family(str(tiny_flux_folder)) == "flux"
    # a folder whose name says flux but whose pipeline is SD3 is SD3, and the other way round
    assert model_family(str(_index(tmp_path / "flux-dev-finetune", "StableDiffusion3Pipeline"))) == "sd3"
    assert model_family(str(_index(tmp_path / "sd3-something", "FluxPipeline"))) == "flux"
    assert pipeline_class(str(tiny_sd3_folder)) == "StableDiffusion3Pipeline"
    # the embedded default name and a weights file are the toy family's, whatever folder is around
    assert model_family("toy") == "toy" and model_family(str(tmp_path / "w.safetensors")) == "toy"
    # must fail: a pipeline class no family claims, a folder without model_index.json
    with pytest.raises(
        ConfigError, match="^model.family: auto cannot tell .*'KandinskyPipeline'.*flux, sd3"
    ) as e:
        resolve_family(str(_index(tmp_path / "kd", "KandinskyPipeline")))
    _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConfigError, match="^model.family: auto: .*empty is a folder without model_index.json"
    ):
        resolve_family(str(tmp_path / "empty"))


def test_auto_reads_the_hub_cache_for_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    snap = tmp_path / "models--myorg--my-finetune" / "snapshots" / "abc123"
    _index(snap, "FluxPipeline")
    (tmp_path / "models--myorg--my-finetune" / "refs").mkdir()
    (tmp_path / "models--myorg--my-finetune" / "refs" / "main").write_text("abc123")
    assert model_family("myorg/my-finetune") == "flux"
    # must fail: a hub id that is not in the cache (no download to find out), in one line naming the key
    with pytest.raises(ConfigError, match=r"^model.family: auto cannot tell .*'myorg/other'.*hub cache") as e:
        model_family("myorg/other")
    assert "set model.family to one of: flux, sd3" in _one_line(e)


# ------------------------------------------------------------------------------ an explicit family


def test_a_fine_tune_under_any_name_loads_with_its_family(tiny_flux_folder, tmp_path):
    from solace.models.flux import FluxAdapter

    renamed = tmp_path / "my-finetune"
    renamed.symlink_to(tiny_flux_folder, target_is_directory=True)
    ad = load_adapter(str(renamed), "flux", device="cpu", dtype="fp32", resolution=16)
    assert isinstance(ad, FluxAdapter) and ad.height == 16
    # the shipped presets name their family: a fine-tune under any hub name checks
    for preset, fam in (("sd35m", "sd3"), ("sd35m_nft", "sd3"), ("sd35m_released_code", "sd3")):
        cfg = load_config(preset, ["model.name=myorg/my-finetune"], check_paths=False)
        assert model_family_of(cfg.model)[0] == fam
    for preset in ("flux", "flux_released_code"):
        assert load_config(preset, ["model.name=x/y"], check_paths=False).model.family == "flux"
    # must fail: the same name with auto (not in any hub cache: HF_HUB_OFFLINE, a fresh name)
    with pytest.raises(
        ConfigError, match="^model.family: auto cannot tell the family of 'myorg/never-cached-9'"
    ):
        load_config("sd35m", ["model.name=myorg/never-cached-9", "model.family=auto"], check_paths=False)
    # must fail: the explicit family is the wrong one for the folder (the flux pipeline has no SD3 parts)
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own error for a pipeline of another class
        load_adapter(str(renamed), "sd3", device="cpu", dtype="fp32", resolution=16)


def test_an_unknown_family_is_one_line_naming_the_key():
    with pytest.raises(
        ConfigError, match="^model.family: no model family named 'sdxl'; registered: flux, sd3"
    ) as e:
        load_config("sd35m", ["model.family=sdxl"], check_paths=False)
    _one_line(e)
    with pytest.raises(ConfigError, match="^model.family: no model family named 'sdxl'"):
        load_adapter("whatever", "sdxl")


def test_config_check_and_the_family_option_of_the_cli(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "check", "sd35m", "model.name=myorg/my-finetune"])
    assert ok.exit_code == 0 and "ok (model family: sd3)" in ok.output
    assert "ok (model family: toy)" in runner.invoke(app, ["config", "check", "toy"]).output
    bad = runner.invoke(app, ["config", "check", "sd35m", "model.family=nosuch"])
    assert bad.exit_code == 2 and "model.family: no model family named 'nosuch'" in bad.output
    # --family on a command that loads a model: must fail for a name no family has, naming the option
    res = runner.invoke(
        app, ["sample", "--model", "toy", "--family", "nosuch", "--out", str(tmp_path / "s.png")]
    )
    assert res.exit_code == 2 and "--family: no model family named 'nosuch'" in res.output


def test_defaults_come_from_the_yaml_layer_not_the_dataclass():
    from solace.trainer.config import ModelCfg, presets_dir

    assert ModelCfg().name == "" and ModelCfg().family == "auto"
    assert "toy" in (presets_dir() / "defaults.yaml").read_text()
    cfg = load_config(None, check_paths=False)  # no preset: the embedded world from defaults.yaml
    assert cfg.model.name == "toy" and model_family_of(cfg.model)[0] == "toy"
    with pytest.raises(ConfigError) as e:  # the layer under every config is not offered as a preset
        load_config("nosuchpreset")
    presets = str(e.value).split("presets: ")[1].split(", ")
    assert "toy" in presets and "defaults" not in presets


def test_registering_a_family_imports_no_diffusers():
    code = (
        "import sys; import solace.models; from solace.models import FAMILIES; "
        "assert {'sd3', 'flux', 'toy'} <= set(FAMILIES.names()); "
        "assert 'diffusers' not in sys.modules, 'diffusers imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_every_registered_family_has_a_size_rule_and_a_loader():
    for name, fam in FAMILIES.items():
        assert callable(fam.load) and isinstance(fam.sizes, SizeRule), name
    assert issubclass(type(load_adapter("toy")), AdapterBase)
