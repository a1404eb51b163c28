"""SD3 / FLUX adapters and LoRA helpers against diffusers' own pipelines (tiny random models, CPU, fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_pipelines import TINY_RESOLUTION as RES
from tiny_pipelines import TINY_T5_MAX_LEN as T5LEN
from tiny_pipelines import make_tiny_flux, make_tiny_sd3

from solace.errors import ConfigError, MissingDependencyError
from solace.models.base import Conditioning, FlowModelAdapter, adapters_disabled
from solace.models.flux import FluxAdapter, pack_latents, unpack_latents
from solace.models.lora import (
    add_lora,
    load_lora,
    lora_parameters,
    lora_state_dict,
    read_lora,
    save_lora,
)
from solace.models.sd3 import SD3Adapter
from solace.sampling.sampler import sample

PROMPTS = ["a red cat", "two dogs on grass"]


def sd3(pipe) -> SD3Adapter:
    return SD3Adapter(pipe, resolution=RES, max_sequence_length=T5LEN)


def flux(pipe, guidance_scale: float = 3.5) -> FluxAdapter:
    return FluxAdapter(pipe, resolution=RES, max_sequence_length=T5LEN, guidance_scale=guidance_scale)


def noise_for(adapter, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *adapter.latent_shape(), generator=torch.Generator().manual_seed(seed))


def capture_transformer_calls(transformer):
    """Record (kwargs, output) of every transformer forward; returns (calls, hook handle)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(
            (
                {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()},
                output[0].detach().clone(),
            )
        )

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


def perturb_lora(denoiser, seed: int = 1, std: float = 0.3) -> None:
    """PEFT LoRA starts as an exact no-op (lora_B = 0): give lora_B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ------------------------------------------------------------------------------------------ protocol/basics


def test_adapters_satisfy_protocol(tiny_sd3_pipe, tiny_flux_pipe):
    a, b = sd3(tiny_sd3_pipe), flux(tiny_flux_pipe)
    assert isinstance(a, FlowModelAdapter) and isinstance(b, FlowModelAdapter)
    assert a.latent_shape() == (16, RES // 2, RES // 2)
    assert b.latent_shape() == ((RES // 4) ** 2, 64)
    assert a.denoiser is tiny_sd3_pipe.transformer and b.denoiser is tiny_flux_pipe.transformer
    assert a.shift == 3.0 and a.dtype == torch.float32 and a.device.type == "cpu"
    # Frozen base weights and text encoders.
    for m in (
        tiny_sd3_pipe.transformer,
        tiny_sd3_pipe.text_encoder,
        tiny_sd3_pipe.text_encoder_3,
        tiny_sd3_pipe.vae,
    ):
        assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_sigmas_equal_the_pipeline_schedulers(tiny_sd3_pipe, tiny_flux_pipe, steps):
    tiny_sd3_pipe.scheduler.set_timesteps(steps)
    torch.testing.assert_close(
        sd3(tiny_sd3_pipe).sigmas(steps), tiny_sd3_pipe.scheduler.sigmas, rtol=0, atol=1e-7
    )
    b = flux(tiny_flux_pipe)
    import numpy as np

    tiny_flux_pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=b.mu)
    torch.testing.assert_close(b.sigmas(steps), tiny_flux_pipe.scheduler.sigmas, rtol=0, atol=1e-7)


def test_bad_resolution_and_dtype_are_config_errors(tiny_sd3_pipe, tiny_flux_pipe):
    with pytest.raises(ConfigError, match="resolution"):
        SD3Adapter(tiny_sd3_pipe, resolution=RES + 1)
    with pytest.raises(ConfigError, match="resolution"):
        FluxAdapter(tiny_flux_pipe, resolution=RES + 2)
    with pytest.raises(ConfigError, match="dtype"):
        SD3Adapter.from_pretrained("unused", dtype="int8")


# ------------------------------------------------------------------------------ (a) velocity == pipeline's


def test_sd3_velocity_equals_transformer_inside_pipeline_call(tiny_sd3_pipe):
    a = sd3(tiny_sd3_pipe)
    z = noise_for(a, 2)
    calls, handle = capture_transformer_calls(tiny_sd3_pipe.transformer)
    try:
        tiny_sd3_pipe(
            prompt=PROMPTS,
            height=RES,
            width=RES,
            num_inference_steps=2,
            guidance_scale=1.0,
            latents=z.clone(),
            output_type="latent",
            max_sequence_length=T5LEN,
        )
    finally:
        handle.remove()
    assert len(calls) == 2
    cond = a.encode_prompts(PROMPTS)
    sig = a.sigmas(2)
    for i, (kw, out) in enumerate(calls):
        t = sig[i].expand(2)
        # The pipeline feeds timestep = sigma * 1000 (float32), exactly what the adapter computes.
        assert torch.equal(kw["timestep"], t * 1000)
        torch.testing.assert_close(kw["encoder_hidden_states"], cond.tensors["prompt_embeds"])
        torch.testing.assert_close(kw["pooled_projections"], cond.tensors["pooled_prompt_embeds"])
        with torch.no_grad():
            v = a.velocity(kw["hidden_states"], t, cond)
        torch.testing.assert_close(v, out, rtol=0, atol=1e-6)


def test_flux_velocity_equals_transformer_inside_pipeline_call(tiny_flux_pipe):
    b = flux(tiny_flux_pipe, guidance_scale=2.5)
    z = noise_for(b, 2)
    calls, handle = capture_transformer_calls(tiny_flux_pipe.transformer)
    try:
        tiny_flux_pipe(
            prompt=PROMPTS,
            height=RES,
            width=RES,
            num_inference_steps=2,
            guidance_scale=2.5,
            latents=z.clone(),
            output_type="latent",
            max_sequence_length=T5LEN,
        )
    finally:
        handle.remove()
    assert len(calls) == 2
    cond = b.encode_prompts(PROMPTS)
    sig = b.sigmas(2)
    for i, (kw, out) in enumerate(calls):
        t = sig[i].expand(2)
        torch.testing.assert_close(kw["timestep"], t, rtol=1e-6, atol=0)  # FLUX: timestep = sigma
        assert torch.equal(kw["guidance"], torch.full((2,), 2.5))
        assert torch.equal(kw["img_ids"], cond.shared["img_ids"])
        with torch.no_grad():
            v = b.velocity(kw["hidden_states"], t, cond)
        torch.testing.assert_close(v, out, rtol=0, atol=1e-6)


# --------------------------------------------------------------------- (b, c) sampler == pipeline's output


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_ode_sampling_reproduces_pipeline_with_cfg(tiny_sd3_pipe, tiny_sd3_pipe_no_t5, with_t5):
    pipe = tiny_sd3_pipe if with_t5 else tiny_sd3_pipe_no_t5
    a = sd3(pipe)
    z = noise_for(a, 2, seed=3)
    ref = pipe(
        prompt=PROMPTS,
        height=RES,
        width=RES,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=z.clone(),
        output_type="latent",
        max_sequence_length=T5LEN,
    ).images
    traj = sample(
        a,
        a.encode_prompts(PROMPTS),
        a.encode_prompts([""] * 2),
        a.sigmas(3),
        z,
        cfg_scale=4.0,
        noise_level=0.0,
    )
    torch.testing.assert_close(traj.final, ref, rtol=0, atol=1e-5)
    t5_part = a.encode_prompts(PROMPTS).tensors["prompt_embeds"][:, 77:]
    assert t5_part.shape[1] == T5LEN
    assert bool((t5_part == 0).all()) != with_t5  # without T5 the pipeline feeds zeros


def test_flux_ode_sampling_reproduces_pipeline(tiny_flux_pipe):
    b = flux(tiny_flux_pipe)
    z = noise_for(b, 2, seed=4)
    cond = b.encode_prompts(PROMPTS)
    # Guidance-distilled use: cfg_scale = 1, guidance embedding 3.5.
    ref = tiny_flux_pipe(
        prompt=PROMPTS,
        height=RES,
        width=RES,
        num_inference_steps=3,
        guidance_scale=3.5,
        latents=z.clone(),
        output_type="latent",
        max_sequence_length=T5LEN,
    ).images
    traj = sample(b, cond, None, b.sigmas(3), z, cfg_scale=1.0, noise_level=0.0)
    torch.testing.assert_close(traj.final, ref, rtol=0, atol=1e-5)
    # "True CFG" with the empty negative prompt = solace's CFG with the empty null prompt.
    ref = tiny_flux_pipe(
        prompt=PROMPTS,
        negative_prompt=[""] * 2,
        true_cfg_scale=3.0,
        height=RES,
        width=RES,
        num_inference_steps=3,
        guidance_scale=3.5,
        latents=z.clone(),
        output_type="latent",
        max_sequence_length=T5LEN,
    ).images
    traj = sample(b, cond, b.encode_prompts([""] * 2), b.sigmas(3), z, cfg_scale=3.0, noise_level=0.0)
    torch.testing.assert_close(traj.final, ref, rtol=0, atol=1e-5)


def test_decode_encode_shapes_and_packing(tiny_sd3_pipe, tiny_flux_pipe):
    z = torch.randn(2, 16, 8, 8)
    assert torch.equal(unpack_latents(pack_latents(z), 8, 8), z)
    for ad in (sd3(tiny_sd3_pipe), flux(tiny_flux_pipe)):
        lat = noise_for(ad, 2)
        with torch.no_grad():
            img = ad.decode(lat)
            assert img.shape == (2, 3, RES, RES) and img.min() >= 0 and img.max() <= 1
            assert ad.encode_images(img).shape == lat.shape


def test_flux_decode_matches_pipeline_image(tiny_flux_pipe):
    b = flux(tiny_flux_pipe)
    z = noise_for(b, 1, seed=5)
    ref = tiny_flux_pipe(
        prompt=PROMPTS[:1],
        height=RES,
        width=RES,
        num_inference_steps=2,
        latents=z.clone(),
        output_type="pt",
        max_sequence_length=T5LEN,
    ).images
    traj = sample(b, b.encode_prompts(PROMPTS[:1]), None, b.sigmas(2), z, cfg_scale=1.0, noise_level=0.0)
    with torch.no_grad():
        torch.testing.assert_close(b.decode(traj.final), ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- (d) from_pretrained(folder)


def test_sd3_from_pretrained_local_folder(tiny_sd3_folder, tiny_sd3_pipe, tiny_sd3_pipe_no_t5):
    a = SD3Adapter.from_pretrained(
        str(tiny_sd3_folder), dtype="fp32", device="cpu", resolution=RES, max_sequence_length=T5LEN
    )
    ref = sd3(tiny_sd3_pipe)
    z, t = noise_for(a, 2), torch.tensor([0.9, 0.3])
    cond = a.encode_prompts(PROMPTS)
    torch.testing.assert_close(
        cond.tensors["prompt_embeds"], ref.encode_prompts(PROMPTS).tensors["prompt_embeds"]
    )
    with torch.no_grad():
        torch.testing.assert_close(a.velocity(z, t, cond), ref.velocity(z, t, cond), rtol=0, atol=1e-6)
    # Without T5: same as the in-memory pipeline built without it.
    a3 = SD3Adapter.from_pretrained(
        str(tiny_sd3_folder),
        dtype="fp32",
        text_encoder_3=False,
        device="cpu",
        resolution=RES,
        max_sequence_length=T5LEN,
    )
    assert a3.pipeline.text_encoder_3 is None
    torch.testing.assert_close(
        a3.encode_prompts(PROMPTS).tensors["prompt_embeds"],
        sd3(tiny_sd3_pipe_no_t5).encode_prompts(PROMPTS).tensors["prompt_embeds"],
    )


def test_flux_from_pretrained_local_folder(tiny_flux_folder, tiny_flux_pipe):
    b = FluxAdapter.from_pretrained(
        str(tiny_flux_folder), dtype="fp32", device="cpu", resolution=RES, max_sequence_length=T5LEN
    )
    ref = flux(tiny_flux_pipe)
    z, t = noise_for(b, 2), torch.tensor([0.9, 0.3])
    cond = ref.encode_prompts(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(b.velocity(z, t, cond), ref.velocity(z, t, cond), rtol=0, atol=1e-6)


def test_from_pretrained_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(MissingDependencyError, match="download"):
        SD3Adapter.from_pretrained(str(tmp_path / "nope"), dtype="fp32", device="cpu")


# --------------------------------------------------------------------------------------- (e, f) LoRA


def test_sd3_lora_roundtrip_through_diffusers_load_lora_weights(tmp_path):
    a = sd3(make_tiny_sd3(seed=0))
    cfg = add_lora(a, rank=4, alpha=8, target_modules=a.lora_target_modules)  # alpha != rank
    assert cfg.r == 4 and cfg.lora_alpha == 8
    perturb_lora(a.denoiser)
    z = noise_for(a, 2, seed=7)
    traj = sample(
        a,
        a.encode_prompts(PROMPTS),
        a.encode_prompts([""] * 2),
        a.sigmas(3),
        z,
        cfg_scale=4.0,
        noise_level=0.0,
    )
    file = save_lora(a, tmp_path / "lora")
    assert file.name == "pytorch_lora_weights.safetensors"
    fresh = make_tiny_sd3(seed=0)
    base = fresh(
        prompt=PROMPTS,
        height=RES,
        width=RES,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=z.clone(),
        output_type="latent",
        max_sequence_length=T5LEN,
    ).images
    fresh.load_lora_weights(str(tmp_path / "lora"))
    (loaded_cfg,) = fresh.transformer.peft_config.values()
    assert loaded_cfg.lora_alpha == 8 and loaded_cfg.r == 4  # metadata kept alpha
    ref = fresh(
        prompt=PROMPTS,
        height=RES,
        width=RES,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=z.clone(),
        output_type="latent",
        max_sequence_length=T5LEN,
    ).images
    torch.testing.assert_close(traj.final, ref, rtol=0, atol=1e-5)
    assert (ref - base).abs().max() > 1e-2  # the LoRA does change the output (alpha loss would show)


def test_flux_lora_roundtrip_through_diffusers_load_lora_weights(tmp_path):
    b = flux(make_tiny_flux(seed=0))
    add_lora(b, rank=2, alpha=6, target_modules=b.lora_target_modules)
    perturb_lora(b.denoiser)
    z = noise_for(b, 2, seed=8)
    traj = sample(b, b.encode_prompts(PROMPTS), None, b.sigmas(3), z, cfg_scale=1.0, noise_level=0.0)
    save_lora(b, tmp_path / "lora")
    fresh = make_tiny_flux(seed=0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    ref = fresh(
        prompt=PROMPTS,
        height=RES,
        width=RES,
        num_inference_steps=3,
        guidance_scale=3.5,
        latents=z.clone(),
        output_type="latent",
        max_sequence_length=T5LEN,
    ).images
    torch.testing.assert_close(traj.final, ref, rtol=0, atol=1e-5)


@pytest.fixture
def trained_lora(tmp_path):
    """An SD3 adapter with a perturbed LoRA (rank 4, alpha 8), saved to tmp_path/lora."""
    a = sd3(make_tiny_sd3(seed=0))
    add_lora(a, rank=4, alpha=8, target_modules=a.lora_target_modules)
    perturb_lora(a.denoiser)
    save_lora(a, tmp_path / "lora")
    return a, tmp_path / "lora"


def _v(adapter, cond: Conditioning) -> torch.Tensor:
    z, t = noise_for(adapter, 2, seed=9), torch.tensor([0.8, 0.25])
    with torch.no_grad():
        return adapter.velocity(z, t, cond)


def test_starting_from_an_existing_lora_gives_identical_velocity(trained_lora):
    a, path = trained_lora
    cond = a.encode_prompts(PROMPTS)
    v = _v(a, cond)
    b = sd3(make_tiny_sd3(seed=0))
    cfg = load_lora(b, path)
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    torch.testing.assert_close(_v(b, cond), v, rtol=0, atol=0)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora_parameters(b))
    c = sd3(make_tiny_sd3(seed=0))
    add_lora(
        c,
        rank=4,
        alpha=8,
        target_modules=c.lora_target_modules,
        init_from=path / "pytorch_lora_weights.safetensors",
    )
    torch.testing.assert_close(_v(c, cond), v, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="alpha"):
        add_lora(
            sd3(make_tiny_sd3(seed=0)), rank=4, alpha=4, target_modules=c.lora_target_modules, init_from=path
        )
    with pytest.raises(ConfigError, match="rank"):
        add_lora(
            sd3(make_tiny_sd3(seed=0)), rank=2, alpha=8, target_modules=c.lora_target_modules, init_from=path
        )


def test_merged_lora_becomes_the_reference(trained_lora):
    a, path = trained_lora
    cond = a.encode_prompts(PROMPTS)
    v = _v(a, cond)
    b = sd3(make_tiny_sd3(seed=0))
    load_lora(b, path, merge=True)
    assert not lora_parameters(b)
    torch.testing.assert_close(_v(b, cond), v, rtol=0, atol=1e-5)
    add_lora(b, rank=2, alpha=4, target_modules=b.lora_target_modules)  # fresh LoRA on top (no-op at start)
    perturb_lora(b.denoiser)
    assert (_v(b, cond) - v).abs().max() > 1e-3
    with adapters_disabled(b.denoiser):
        torch.testing.assert_close(_v(b, cond), v, rtol=0, atol=1e-5)


def test_loads_peft_save_pretrained_folders(tmp_path):
    """Flow-GRPO checkpoints are PEFT ``save_pretrained`` folders (adapter_model.safetensors + config)."""
    from peft import LoraConfig, get_peft_model

    src = sd3(make_tiny_sd3(seed=0))
    model = get_peft_model(src.denoiser, LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "to_v"]))
    perturb_lora(model)
    model.save_pretrained(str(tmp_path / "peft"))
    cond = src.encode_prompts(PROMPTS)
    v = _v(src, cond)  # get_peft_model injected the LoRA into src.denoiser in place
    assert (v - _v(sd3(make_tiny_sd3(seed=0)), cond)).abs().max() > 1e-2
    state, meta = read_lora(tmp_path / "peft")
    assert meta["lora_alpha"] == 5 and all(k.startswith("transformer_blocks.") for k in state)
    b = sd3(make_tiny_sd3(seed=0))
    load_lora(b, tmp_path / "peft")
    torch.testing.assert_close(_v(b, cond), v, rtol=0, atol=1e-6)


def test_adapters_disabled_gives_the_base_velocity(tiny_sd3_pipe):
    base = sd3(tiny_sd3_pipe)
    cond = base.encode_prompts(PROMPTS)
    v0 = _v(base, cond)
    a = sd3(make_tiny_sd3(seed=0))
    add_lora(a, rank=4, alpha=8, target_modules=a.lora_target_modules)
    torch.testing.assert_close(_v(a, cond), v0, rtol=0, atol=0)  # fresh LoRA: exact no-op
    perturb_lora(a.denoiser)
    v1 = _v(a, cond)
    assert (v1 - v0).abs().max() > 1e-2
    with adapters_disabled(a.denoiser):
        torch.testing.assert_close(_v(a, cond), v0, rtol=0, atol=0)
    torch.testing.assert_close(_v(a, cond), v1, rtol=0, atol=0)  # back on afterwards


def test_lora_gradients_flow_and_base_stays_frozen():
    b = flux(make_tiny_flux(seed=0))
    b.denoiser.enable_gradient_checkpointing()
    add_lora(b, rank=2, alpha=4, target_modules=b.lora_target_modules)
    perturb_lora(b.denoiser)
    cond = b.encode_prompts(PROMPTS)
    b.denoiser.train()
    b.velocity(noise_for(b, 2), torch.tensor([0.7, 0.4]), cond).square().mean().backward()
    params = lora_parameters(b)
    assert params and all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in b.denoiser.named_parameters() if "lora_" not in n)
    assert set(lora_state_dict(b)) == {
        n.replace(".default", "") for n, _ in b.denoiser.named_parameters() if "lora_" in n
    }


def test_save_format_and_pickle_refusal(trained_lora, tmp_path):
    from safetensors import safe_open

    _, path = trained_lora
    with safe_open(str(path / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    meta = json.loads(header["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == 8 and meta["transformer.r"] == 4
    (tmp_path / "bad").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad" / "pytorch_lora_weights.bin")
    with pytest.raises(ConfigError, match="safetensors"):
        read_lora(tmp_path / "bad")
    with pytest.raises(ConfigError, match="safetensors"):
        read_lora(tmp_path / "bad" / "pytorch_lora_weights.bin")


def test_adapter_without_vae_or_text_encoders_runs_latent_only():
    """A pipeline without VAE or text encoders runs on latents and given conditioning; decode fails."""
    pipe = make_tiny_sd3(seed=0)
    cond = sd3(pipe).encode_prompts(PROMPTS)
    pipe.vae = None
    a = sd3(pipe)
    assert a.vae_scale_factor == 2  # taken from the pipeline, not the (missing) VAE
    with torch.no_grad():
        assert a.velocity(noise_for(a, 2), torch.tensor([0.5, 0.5]), cond).shape == (2, *a.latent_shape())
    with pytest.raises(ConfigError, match="vae"):
        a.decode(noise_for(a, 1))


def test_load_adapter_dispatches_local_pipeline_folders(tiny_sd3_folder, tiny_flux_folder):
    from solace.models import load_adapter

    kw = dict(dtype="fp32", device="cpu", resolution=RES, max_sequence_length=T5LEN)
    assert isinstance(load_adapter(str(tiny_sd3_folder), **kw), SD3Adapter)
    assert isinstance(load_adapter(str(tiny_flux_folder), **kw), FluxAdapter)
