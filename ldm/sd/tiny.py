"""Tiny random Stable Diffusion v1 components for offline demos and tests (issue 12 item 12).

write_tiny_sd(folder) writes folder/{vae,text_encoder,tokenizer,scheduler}/ and
folder/unet_config.json (a random-init UNet config for --unet_name_or_path);
write_tiny_sd(folder, unet_weights=True) also writes folder/unet/. Two backends, same shapes:
- backend="paddle" (the default; what scripts/make_tiny_sd.py and `STAGE=sd MODEL_VERSION=tiny sh
  train.sh` use): built with ppdiffusers / ppdiffusers.transformers, so only requirements.txt is
  needed (no torch). Weights are Paddle-layout safetensors written by ldm.weights
  (diffusion_paddle_model.safetensors for the VAE/UNet, model.safetensors for the text encoder,
  metadata format "np") next to each model's config.json.
- backend="torch": built with diffusers/transformers (PyTorch layout, the format of released SD v1
  checkpoints; torch, diffusers and transformers from requirements-dev.txt). The tests' diffusers
  parity checks use this one (tests/sd_tiny.py build_tiny_sd).
ldm.sd.loading reads both. The tokenizer is a CLIP BPE tokenizer with the 256 byte-level symbols
only (no merges), so it needs no download.
Shapes: diffusers UNet2DConditionModel / AutoencoderKL and transformers CLIPTextConfig arguments;
the byte table is GPT-2's bytes_to_unicode (openai/gpt-2 src/encoder.py).
"""
import json
import os

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
)
TINY_CLIP = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
SCHEDULER = dict(_class_name="DDPMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1)


def _bytes_to_unicode():
    """GPT-2/CLIP byte -> printable character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder, model_max_length=16):
    """A CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) of TINY_CLIP's vocab size."""
    os.makedirs(folder, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if len(vocab) != TINY_CLIP["vocab_size"]:
        raise ValueError(f"tiny tokenizer vocab has {len(vocab)} entries, TINY_CLIP expects {TINY_CLIP['vocab_size']}")
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": model_max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
    return folder


BACKENDS = ("paddle", "torch")


def _write_common(folder):
    write_tokenizer(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f)
    with open(os.path.join(folder, "unet_config.json"), "w") as f:
        json.dump(dict(TINY_UNET, _class_name="UNet2DConditionModel"), f)


def _save_paddle_model(model, folder, weights_name, model_name):
    """model's state dict as Paddle-layout safetensors (ldm.weights writer); position_ids buffers left out."""
    from ldm.weights import save_safetensors, weights_metadata

    os.makedirs(folder, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_safetensors(state, os.path.join(folder, weights_name), metadata=weights_metadata(model_name))


def _write_paddle(folder, unet_weights, seed):
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    paddle.seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    vae.save_config(os.path.join(folder, "vae"))
    _save_paddle_model(vae, os.path.join(folder, "vae"), "diffusion_paddle_model.safetensors", "sd_vae")
    config = CLIPTextConfig(**TINY_CLIP)
    te = CLIPTextModel(config)
    config.save_pretrained(os.path.join(folder, "text_encoder"))
    _save_paddle_model(te, os.path.join(folder, "text_encoder"), "model.safetensors", "sd_text_encoder")
    if unet_weights:
        unet = UNet2DConditionModel(**TINY_UNET)
        unet.save_config(os.path.join(folder, "unet"))
        _save_paddle_model(unet, os.path.join(folder, "unet"), "diffusion_paddle_model.safetensors", "sd_unet")


def _write_torch(folder, unet_weights, seed):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE).save_pretrained(os.path.join(folder, "vae"))
    CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).save_pretrained(os.path.join(folder, "text_encoder"))
    if unet_weights:
        UNet2DConditionModel(**TINY_UNET).save_pretrained(os.path.join(folder, "unet"))


def write_tiny_sd(folder, unet_weights=False, seed=0, backend="paddle"):
    """Write the tiny random SD v1 components into folder (see the module docstring); returns folder.
    backend: "paddle" (ppdiffusers, Paddle-layout weights, no torch needed) or "torch"
    (diffusers/transformers, PyTorch layout)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    (_write_paddle if backend == "paddle" else _write_torch)(folder, unet_weights, seed)
    _write_common(folder)
    return folder
