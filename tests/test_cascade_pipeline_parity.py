"""End to end against diffusers: StableCascadePriorPipeline + StableCascadeDecoderPipeline with
tiny random components vs ModelC + ModelB reading the same weights converted by this project's
scripts (scripts/convert_unet_weight.py, scripts/convert_other_weight.py), CPU, fp32.

The sampler settings that define the same updates in both:
- diffusers' DDPMWuerstchenScheduler step is the DDPM posterior step, which equals GDF's DDIM step
  with eta = 1 on the same cosine schedule (clamp [1e-4, 0.9999]) at shift 1; diffusers has no
  cfg_rho, so cfg_rho = 0 (plain lerp guidance);
- diffusers feeds the network r = t while GDF feeds CosineTNoiseCond(logSNR(t)), which is t
  except where the schedule clamps (t > 0.9936) and up to float32 rounding: the grids start below
  1 (0.85 for Stage C, 0.78 for Stage B) where the round trip is exact, in both implementations;
- same initial noise (``latents`` / ``x_init``) and the same per-step noise (diffusers'
  ``randn_tensor`` is replaced by a queue); diffusers adds no noise on its last step (the queue
  gives GDF zeros there) and returns the sample after the last update (``final="x"``).
Compared: Stage C latents, Stage B latents (<= 1e-4) and final pixels (<= 1/255).
"""
import os
import sys

import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline  # noqa: E402
from diffusers.models import StableCascadeUNet  # noqa: E402
from diffusers.pipelines.wuerstchen.modeling_paella_vq_model import PaellaVQModel  # noqa: E402
from diffusers.schedulers import scheduling_ddpm_wuerstchen  # noqa: E402

from ldm.cascade import settings as C  # noqa: E402
from ldm.clip import write_tiny_clip_tokenizer  # noqa: E402
from ldm.cascade.previewer import Previewer_tiny  # noqa: E402
from ldm.model_b import ModelB  # noqa: E402
from ldm.model_c import ModelC  # noqa: E402
from ldm.weights import save_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import convert_other_weight  # noqa: E402
import convert_unet_weight  # noqa: E402

# Time grids linspace(start, 0, steps + 1) on which GDF's float32 t -> logSNR -> r round trip gives
# r == t bit for bit (checked below): one float32 ulp in r moves these random networks' output by
# ~5e-4, because r enters as sin(10000 r f).
START_C, STEPS_C, START_B, STEPS_B = 0.85, 4, 0.78, 3
CFG_C, CFG_B = 4.0, 1.1
H = W = 128  # Stage C latent 3 x 3, Stage B latent 32 x 32
CAPTIONS = ["a red cube on a table", "two cats"]
RES, TS, AT = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
# diffusers configs equal to this project's "tiny" presets of Stage C / Stage B
PRIOR = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=32,
             block_out_channels=[32, 64], num_attention_heads=[2, 4], down_num_layers_per_block=[1, 2],
             up_num_layers_per_block=[2, 1], down_blocks_repeat_mappers=[2, 1], up_blocks_repeat_mappers=[1, 2],
             block_types_per_layer=[[RES, TS], [RES, TS, AT]], clip_text_in_channels=32,
             clip_text_pooled_in_channels=32, clip_image_in_channels=32, clip_seq=4, kernel_size=3,
             dropout=[0.0, 0.0], self_attn=True, timestep_conditioning_type=["sca", "crp"], switch_level=[False])
DECODER = dict(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2, conditioning_dim=32,
               block_out_channels=[16, 32], num_attention_heads=[0, 2], down_num_layers_per_block=[1, 2],
               up_num_layers_per_block=[2, 1], down_blocks_repeat_mappers=[2, 1], up_blocks_repeat_mappers=[1, 2],
               block_types_per_layer=[[RES, TS], [RES, TS, AT]], clip_text_pooled_in_channels=32, clip_seq=4,
               effnet_in_channels=16, pixel_mapper_in_channels=3, kernel_size=3, dropout=[0.0, 0.0],
               self_attn=True, timestep_conditioning_type=["sca"], switch_level=None)
VQGAN = dict(levels=2, bottleneck_blocks=2, embed_dim=32, latent_channels=4, num_vq_embeddings=64)


def grid_scheduler(start):
    class GridScheduler(DDPMWuerstchenScheduler):
        """DDPMWuerstchenScheduler on linspace(start, 0, n + 1) instead of linspace(1, 0, n + 1)."""

        def set_timesteps(self, num_inference_steps=None, timesteps=None, device=None):
            super().set_timesteps(timesteps=torch.linspace(start, 0.0, num_inference_steps + 1), device=device)

    return GridScheduler()


def _randomise(model, seed):
    """Every parameter non-zero (diffusers zero-initialises output layers and GRN), moderate scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7 / float(np.sqrt(np.prod(p.shape[1:]))))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cascade")
    src, weights = d / "src", d / "weights"
    torch.manual_seed(0)
    prior = _randomise(StableCascadeUNet(**PRIOR), 1)
    decoder = _randomise(StableCascadeUNet(**DECODER), 2)
    vqgan = _randomise(PaellaVQModel(**VQGAN), 3)  # non-zero ResBlock gammas: Stage A really runs
    # transformers CLIP text tower + the tiny byte-level tokenizer, saved as transformers does
    clip_dir = src / "clip_text"
    vocab = write_tiny_clip_tokenizer(str(clip_dir))
    text_cfg = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    text_encoder = transformers.CLIPTextModelWithProjection(text_cfg).eval()
    text_encoder.save_pretrained(str(clip_dir), safe_serialization=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    prior.save_pretrained(str(src / "prior"), safe_serialization=True)
    decoder.save_pretrained(str(src / "decoder"), safe_serialization=True)
    vqgan.save_pretrained(str(src / "vqgan"), safe_serialization=True)

    # this project's converters, in process
    convert_unet_weight.main(["--input", str(src / "prior"), "--output", str(weights / "stage_c_lite.safetensors"),
                              "--stage", "c", "--preset", "tiny"])
    convert_unet_weight.main(["--input", str(src / "decoder"), "--output", str(weights / "stage_b_lite.safetensors"),
                              "--stage", "b", "--preset", "tiny"])
    convert_other_weight.main(["--clip_text_dir", str(clip_dir), "--vqgan_dir", str(src / "vqgan"),
                               "--output_dir", str(weights)])
    paddle.seed(0)  # the previewer has no diffusers counterpart: any tiny weights
    save_safetensors(Previewer_tiny().state_dict(), str(weights / "previewer.safetensors"), metadata={"format": "np"})

    pipes = (StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior,
                                        scheduler=grid_scheduler(START_C)),
             StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer, text_encoder=text_encoder,
                                          scheduler=grid_scheduler(START_B), vqgan=vqgan))
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    cfg = C.CascadeConfig(weights_path=str(weights), model_c_version="tiny", model_b_version="tiny")
    return pipes, cfg


def _noise(seed, shape, steps):
    """Initial noise and per-step noise (numpy), the same for both implementations."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), [rng.standard_normal(shape, dtype=np.float32)
                                                          for _ in range(steps)]


def _torch_queue(monkeypatch, zs):
    queue = [torch.from_numpy(z.copy()) for z in zs]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        z = queue.pop(0)
        assert tuple(z.shape) == tuple(shape)
        return z.to(dtype)

    monkeypatch.setattr(scheduling_ddpm_wuerstchen, "randn_tensor", randn_tensor)
    return queue


def _paddle_noise(zs):
    """GDF draws one z per step; its last step gets zeros (diffusers drops that noise)."""
    queue = [paddle.to_tensor(z) for z in zs[:-1]] + [paddle.zeros(zs[-1].shape, "float32")]

    def draw(shape):
        z = queue.pop(0)
        assert list(z.shape) == list(shape)
        return z

    return draw, queue


@pytest.mark.parametrize("start, steps", [(START_C, STEPS_C), (START_B, STEPS_B)])
def test_time_grid_round_trips_exactly(start, steps):
    """The grids used below: same t values in torch and paddle, and r(t) == t in GDF."""
    from ldm.cascade.gdf import stable_cascade_gdf

    gdf = stable_cascade_gdf()
    t = paddle.linspace(start, 0.0, steps + 1, dtype="float32")
    assert np.array_equal(t.numpy(), torch.linspace(start, 0.0, steps + 1).numpy())
    r = gdf.noise_cond(gdf.schedule(t, shift=1.0)).numpy()
    assert np.array_equal(r[:-1], t.numpy()[:-1])


def test_prior_and_decoder_match_diffusers_end_to_end(setup, monkeypatch):
    (prior_pipe, decoder_pipe), cfg = setup
    bsz = len(CAPTIONS)
    x_c, z_c = _noise(10, (bsz, 16, 3, 3), STEPS_C)
    x_b, z_b = _noise(11, (bsz, 4, 32, 32), STEPS_B)

    # diffusers
    q = _torch_queue(monkeypatch, z_c + z_b)
    with torch.no_grad():
        ref_c = prior_pipe(prompt=CAPTIONS, height=H, width=W, num_inference_steps=STEPS_C, guidance_scale=CFG_C,
                           latents=torch.from_numpy(x_c), output_type="pt").image_embeddings
        seen = {}

        def grab(pipe, i, t, kw):
            seen["latents"] = kw["latents"].clone()
            return kw

        ref_px = decoder_pipe(image_embeddings=ref_c, prompt=CAPTIONS, num_inference_steps=STEPS_B,
                              guidance_scale=CFG_B, latents=torch.from_numpy(x_b), output_type="np",
                              callback_on_step_end=grab).images
    assert q == []  # every step drew its noise
    ref_c, ref_b = ref_c.numpy(), seen["latents"].numpy()
    assert ref_c.shape == (bsz, 16, 3, 3) and ref_b.shape == (bsz, 4, 32, 32) and ref_px.shape == (bsz, H, W, 3)

    # this project, from the converted files
    model, model_b = ModelC(cfg, progress=False).eval(), ModelB(cfg, progress=False).eval()
    noise_c, qc = _paddle_noise(z_c)
    _, lat_c = model.log_image(CAPTIONS, height=H, width=W, cfg=CFG_C, batch_size=bsz, steps=STEPS_C, shift=1.0,
                               cfg_rho=0.0, t_start=START_C, x_init=paddle.to_tensor(x_c), noise=noise_c, final="x")
    noise_b, qb = _paddle_noise(z_b)
    px, lat_b = model_b.log_image(lat_c, CAPTIONS, batch_size=bsz, steps=STEPS_B, cfg=CFG_B, shift=1.0, cfg_rho=0.0,
                                  t_start=START_B, x_init=paddle.to_tensor(x_b), noise=noise_b, final="x",
                                  height=H, width=W, return_float=True)
    assert qc == [] and qb == []
    d_c = np.abs(lat_c.numpy() - ref_c).max()
    d_b = np.abs(lat_b.numpy() - ref_b).max()
    d_px = np.abs(px.numpy().transpose(0, 2, 3, 1) - ref_px).max()
    print(f"max abs diff: stage C {d_c:.2e} (|x| {np.abs(ref_c).max():.2f}), stage B {d_b:.2e} "
          f"(|x| {np.abs(ref_b).max():.2f}), pixels {d_px:.2e}")
    assert d_c <= 1e-4 and d_b <= 1e-4 and d_px <= 1.0 / 255
    # not a vacuous comparison: the settings the test pins down do matter at this tolerance
    _, lat_rho = model.log_image(CAPTIONS, height=H, width=W, cfg=CFG_C, batch_size=bsz, steps=STEPS_C, shift=1.0,
                                 cfg_rho=0.7, t_start=START_C, x_init=paddle.to_tensor(x_c),
                                 noise=_paddle_noise(z_c)[0], final="x")
    _, lat_x0 = model.log_image(CAPTIONS, height=H, width=W, cfg=CFG_C, batch_size=bsz, steps=STEPS_C, shift=1.0,
                                cfg_rho=0.0, t_start=START_C, x_init=paddle.to_tensor(x_c),
                                noise=_paddle_noise(z_c)[0], final="x0")
    _, lat_neg = model.log_image(CAPTIONS, height=H, width=W, cfg=CFG_C, batch_size=bsz, steps=STEPS_C, shift=1.0,
                                 cfg_rho=0.0, t_start=START_C, x_init=paddle.to_tensor(x_c),
                                 noise=_paddle_noise(z_c)[0], final="x", negative_caption="blurry, ugly, low quality")
    controls = [float(np.abs(o.numpy() - ref_c).max()) for o in (lat_rho, lat_x0, lat_neg)]
    print("controls (cfg_rho 0.7, final x0, negative caption):", controls)
    assert min(controls) > 1e-3
    # guidance, text and the Stage C latent all move the result
    assert np.abs(ref_c[0] - ref_c[1]).max() > 1e-2 and np.abs(ref_b[0] - ref_b[1]).max() > 1e-2
    assert 0.05 < ref_px.std() and np.abs(ref_px[0] - ref_px[1]).max() > 0.05


def test_seed_pdparams_folder_gives_the_same_latents(setup, tmp_path):
    """The seed's archive format: the same networks saved with paddle.save as `.pdparams` (read by
    the restricted unpickler) next to the converted CLIP folder give identical latents, and
    `.safetensors` wins when both exist."""
    import shutil

    from ldm.cascade import components as cp
    from ldm.cascade.loading import load_stage_b, load_stage_c

    _, cfg = setup
    src = cfg.weights_path
    shutil.copytree(os.path.join(src, "clip_text"), tmp_path / "clip_text")
    for name, load in (("stage_c_lite", lambda p: load_stage_c(p, "tiny")), ("stage_b_lite", lambda p: load_stage_b(p, "tiny"))):
        paddle.save(load(os.path.join(src, f"{name}.safetensors")).state_dict(), str(tmp_path / f"{name}.pdparams"))
    for name in ("stage_a", "previewer"):
        shutil.copy(os.path.join(src, f"{name}.safetensors"), tmp_path / f"{name}.safetensors")
    cfg_pd = C.CascadeConfig(weights_path=str(tmp_path), model_c_version="tiny", model_b_version="tiny")
    assert cp.resolve_weights(cfg_pd, ["stage_c", "stage_b"]) == {
        "stage_c": str(tmp_path / "stage_c_lite.pdparams"), "stage_b": str(tmp_path / "stage_b_lite.pdparams")}

    def run(c):
        m, mb = ModelC(c, progress=False), ModelB(c, progress=False)
        _, lat_c = m.log_image("a cat", height=H, width=W, batch_size=1, seed=5, steps=2)
        _, lat_b = mb.log_image(lat_c, "a cat", seed=5, steps=2)
        return lat_c.numpy(), lat_b.numpy()

    for a, b in zip(run(cfg), run(cfg_pd)):
        assert np.array_equal(a, b)
    shutil.copy(os.path.join(src, "stage_c_lite.safetensors"), tmp_path / "stage_c_lite.safetensors")
    assert cp.resolve_weights(cfg_pd, ["stage_c"])["stage_c"] == str(tmp_path / "stage_c_lite.safetensors")


def _reference_gdf_sample(prior, cond, uncond, noise, steps, cfg, cfg_rho, shift):
    """The original GDF sampling loop at its inference defaults, written in torch from its
    formulas (Stability-AI/StableCascade gdf/: CosineSchedule clamp [1e-4, 0.9999] with
    logSNR += 2 ln(1/shift) clamped to the unshifted [logSNR(1), logSNR(0)], CosineTNoiseCond, VPScaler, EpsilonTarget, DDIM eta=1, lerp guidance
    with cfg_rho std rescale over the batch); returns the last x0 as the notebook does."""
    import math

    s = 0.008
    min_var = math.cos(s / (1 + s) * math.pi * 0.5) ** 2

    def unshifted(t):
        var = (torch.cos((t + s) / (1 + s) * math.pi * 0.5).clamp(0, 1) ** 2 / min_var).clamp(1e-4, 0.9999)
        return (var / (1 - var)).log()

    lo, hi = unshifted(torch.tensor(1.0)), unshifted(torch.tensor(0.0))  # BaseSchedule.limits (force_limits)

    def log_snr(t):
        return (unshifted(t) + 2 * math.log(1 / shift)).clamp(lo, hi)

    def r_of(ls):
        var = torch.sigmoid(ls).clamp(0, 1)
        return ((var * min_var).sqrt().acos() / (math.pi * 0.5) * (1 + s) - s).clamp(0, 1)

    ts = torch.linspace(1.0, 0.0, steps + 1)
    x = noise.pop(0)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    for i in range(steps):
        ls, ls_next = log_snr(ts[i]).expand(x.shape[0]), log_snr(ts[i + 1]).expand(x.shape[0])
        r = r_of(ls)
        pred_c, pred_u = prior(sample=torch.cat([x, x]), timestep_ratio=torch.cat([r, r]), **both).sample.chunk(2)
        g = torch.lerp(pred_u, pred_c, cfg)
        pred = cfg_rho * g * pred_c.std() / (g.std() + 1e-9) + (1 - cfg_rho) * g
        a, b = ls.sigmoid().sqrt().view(-1, 1, 1, 1), (-ls).sigmoid().sqrt().view(-1, 1, 1, 1)
        a2, b2 = ls_next.sigmoid().sqrt().view(-1, 1, 1, 1), (-ls_next).sigmoid().sqrt().view(-1, 1, 1, 1)
        x0 = (x - b * pred) / a
        sigma = (b2 ** 2 / b ** 2).sqrt() * (1 - a ** 2 / a2 ** 2).sqrt()
        x = a2 * x0 + (b2 ** 2 - sigma ** 2).sqrt() * pred + sigma * noise.pop(0)
    return x0


def test_default_stage_c_sampling_matches_the_original_gdf_loop(setup):
    """ModelC's defaults (t from 1.0 with the clamped schedule and noise condition, shift 2,
    cfg 4, cfg_rho 0.7, the last x0 as result, initial noise drawn by the sampler) against the
    torch loop above on the same weights and noise (batch 1, where the original's batch std and
    our per-image std coincide)."""
    (prior_pipe, _), cfg = setup
    steps, caption = 4, "a red cube on a table"
    rng = np.random.default_rng(3)
    zs = [rng.standard_normal((1, 16, 3, 3), dtype=np.float32) for _ in range(steps + 1)]  # x_T, then one per step
    tok, te = prior_pipe.tokenizer, prior_pipe.text_encoder

    def enc(text):
        ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = te(ids.input_ids, attention_mask=ids.attention_mask, output_hidden_states=True)
        return out.hidden_states[-1], out.text_embeds.unsqueeze(1)

    with torch.no_grad():
        (ct, cp), (ut, up) = enc(caption), enc("")
        img = torch.zeros(1, 1, 32)
        ref = _reference_gdf_sample(prior_pipe.prior, dict(clip_text=ct, clip_text_pooled=cp, clip_img=img),
                                    dict(clip_text=ut, clip_text_pooled=up, clip_img=img),
                                    [torch.from_numpy(z) for z in zs], steps, C.STAGE_C_SAMPLING.cfg,
                                    C.STAGE_C_SAMPLING.cfg_rho, C.STAGE_C_SAMPLING.shift).numpy()
    queue = [paddle.to_tensor(z) for z in zs]
    _, lat = ModelC(cfg, progress=False).log_image(caption, height=H, width=W, steps=steps,
                                                    noise=lambda shape: queue.pop(0))
    assert queue == []
    d, scale = float(np.abs(lat.numpy() - ref).max()), float(np.abs(ref).max())
    print(f"default Stage C sampling vs the original loop: max abs diff {d:.2e} (|x0| {scale:.2f})")
    # Random networks do not predict the noise, so x0 = (x - b pred) / a with a = 0.01 at t = 1
    # reaches hundreds; the comparison is relative there: 1e-5 of the largest value (~100 ulps).
    assert d <= 1e-5 * scale
