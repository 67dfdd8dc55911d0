"""The Stable Diffusion v1 family of the demo (issue 14): its component configs, the word-level
tokenizer, the tiny frozen random CLIP text encoder, the small VAE and its training loop.

The UNet is not trained here: `scripts/train_demo_sd.sh` pretrains it with the project's own
`train_txt2img_laion400m_trainer.py` on LAION part files that `create_pretraining_data.py` makes
from the shapes jsonl (`ldm.demo.shapes.write_jsonl`). This module makes the parts users normally
download:
- tokenizer: the byte-level CLIP BPE tokenizer of `ldm.sd.tiny.write_tokenizer`, plus one token
  and BPE merge chain per demo word (`DEMO_WORDS`), so a caption is 7 word tokens (a byte-level
  one is ~30 tokens and the colour words would have to be read letter by letter);
- text encoder: a ppdiffusers CLIPTextModel of `DEMO_CLIP`'s shape, random and frozen
  (`make_text_encoder`): token and position embeddings drawn at std 1, so each word keeps its own
  embedding through the residual stream and position tells shape colour from background; it has
  `MAX_LENGTH` = 10 positions, so prompts are padded to 10 tokens, not CLIP's 77 (the loaders pad
  to the text encoder's positions);
- VAE: a ppdiffusers AutoencoderKL of `DEMO_VAE` (4 blocks: 128 px -> 16x16x4 latents) trained by
  `train_vae` on rendered shapes with L1 + L2 reconstruction and a small KL term (the KL-f8 recipe
  of Rombach et al. 2022 without the perceptual and GAN terms, which flat shapes do not need); its
  `scaling_factor` is set to 1 / std of the latents of the data, as SD v1's 0.18215 was.

Folder layout (`write_components` + the trained UNet): <dir>/{vae,text_encoder,tokenizer,scheduler,
unet}/, what ldm.sd.loading reads; weights are ldm.weights safetensors with the config in their
metadata besides config.json.
"""
import json
import os
from typing import Optional

import numpy as np

from ldm.utils import get_logger

logger = get_logger("ldm.demo.sd")

RESOLUTION = 128
LOGVAR_INIT = -8.0  # initial posterior log-variance of the VAE (see train_vae)
DEMO_WORDS = ("a", "on", "background") + ("red", "green", "blue", "yellow", "white", "black") + (
    "circle", "square", "triangle")
# prompts are padded to MAX_LENGTH tokens (bos, 7 words, eos, 1 pad): at CLIP's 77 the 68 padding
# positions, the same for every caption, took most of the UNet's cross-attention and it ignored the text
MAX_LENGTH = 10
_BYTE_VOCAB = 514  # ldm.sd.tiny.TINY_CLIP's vocabulary: 256 bytes, 256 bytes + </w>, bos, eos
DEMO_CLIP = dict(vocab_size=_BYTE_VOCAB + len(DEMO_WORDS) - 1,  # "a</w>" is a byte token already
                 hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=MAX_LENGTH, bos_token_id=512, eos_token_id=513, pad_token_id=513)
TOKEN_STD = POSITION_STD = 1.0  # init std of the text encoder's token / position embeddings (make_text_encoder)
DEMO_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 16, 32, 32], layers_per_block=1,
                latent_channels=4, norm_num_groups=1, sample_size=RESOLUTION)
# attention only at 8x8 and 4x4 latents (and the 4x4 mid block): ~1.7M parameters, ~0.5 s per
# training step of 16 on one CPU thread
DEMO_UNET = dict(sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=[32, 64, 64],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 cross_attention_dim=DEMO_CLIP["hidden_size"], norm_num_groups=8, attention_head_dim=2)
# sampling defaults of `generate_sd.py --preset demo` (measured on the shipped weights)
SAMPLING = dict(height=RESOLUTION, width=RESOLUTION, num_inference_steps=25, guidance_scale=4.0, scheduler="ddim")


def demo_sd_dir() -> str:
    """assets/demo/sd of the repository this package lives in (any working directory)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "assets", "demo", "sd")


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def _bpe(word: str, ranks: dict) -> list:
    """CLIP's BPE of one word (Radford et al. 2021; openai/CLIP simple_tokenizer.py): the
    last symbol carries </w>; repeatedly merge the best-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = set(zip(parts, parts[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_merges(words) -> list:
    """BPE merges (in rank order) after which each word is one symbol: for each word, the first
    pair left unmerged is appended until the word is whole (appended merges rank after the
    earlier ones, so they never change an earlier word's result)."""
    merges, ranks = [], {}
    for w in words:
        while True:
            parts = _bpe(w, ranks)
            if len(parts) == 1:
                break
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def write_tokenizer(folder: str) -> str:
    """The tiny byte-level tokenizer plus DEMO_WORDS as whole-word tokens (ids after the bytes)."""
    from ldm.sd.tiny import write_tokenizer as write_byte_tokenizer

    write_byte_tokenizer(folder, model_max_length=DEMO_CLIP["max_position_embeddings"])
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    for w in DEMO_WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    if len(vocab) != DEMO_CLIP["vocab_size"]:
        raise ValueError(f"demo vocabulary has {len(vocab)} entries, DEMO_CLIP expects {DEMO_CLIP['vocab_size']}")
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in word_merges(DEMO_WORDS)))
    return folder


# ---------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------
def save_model(model, folder: str, weights_name: str, model_name: str) -> str:
    """model's config.json + its state dict as ldm.weights safetensors with the config in the
    metadata (position_ids buffers left out); returns the weights path."""
    from ldm.weights import save_safetensors, weights_metadata

    os.makedirs(folder, exist_ok=True)
    if hasattr(model, "save_config"):  # ppdiffusers models
        model.save_config(folder)
        config = dict(model.config)
    else:  # ppdiffusers.transformers models
        model.config.save_pretrained(folder)
        config = model.config.to_dict()
    # the folder it was loaded from (a build folder) means nothing on a user's machine: not shipped
    config.pop("_name_or_path", None)
    config_file = os.path.join(folder, "config.json")
    with open(config_file, encoding="utf-8") as f:
        written = json.load(f)
    if written.pop("_name_or_path", None) is not None:
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(written, f, indent=2, sort_keys=True)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    path = os.path.join(folder, weights_name)
    save_safetensors(state, path, metadata=weights_metadata(model_name, config=json.loads(json.dumps(config,
                                                                                                     default=str))))
    return path


def make_text_encoder(seed: int = 0):
    """The frozen random CLIPTextModel of DEMO_CLIP: paddle's init (seed), then token and position
    embeddings redrawn from N(0, TOKEN_STD^2) and N(0, POSITION_STD^2) (numpy, [seed, 0x7E]). At
    CLIP's 0.02 the embeddings are small against the random layers' output, and different captions
    come out at cosine 0.96-0.99; at 1.0 each position's output is dominated by its word + position
    (two captions one word apart: cosine ~0.4-0.6 at that word, ~1 elsewhere)."""
    import paddle
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    paddle.seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**DEMO_CLIP))
    emb = model.text_model.embeddings
    rng = np.random.default_rng([seed, 0x7E])
    for table, std in ((emb.token_embedding.weight, TOKEN_STD), (emb.position_embedding.weight, POSITION_STD)):
        table.set_value(rng.normal(0.0, std, table.shape).astype(np.float32))
    model.eval()
    return model


def write_components(folder: str, seed: int = 0) -> str:
    """<folder>/{text_encoder,tokenizer,scheduler}/ and <folder>/unet_config.json (the UNet to
    pretrain, random init); the VAE comes from `train_vae`. Returns folder."""
    from ldm.sd.tiny import SCHEDULER

    os.makedirs(folder, exist_ok=True)
    save_model(make_text_encoder(seed), os.path.join(folder, "text_encoder"), "model.safetensors", "sd_text_encoder")
    write_tokenizer(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(SCHEDULER, f)
    with open(os.path.join(folder, "unet_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(DEMO_UNET, _class_name="UNet2DConditionModel"), f)
    return folder


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------
def _shape_batch(rng: np.random.Generator, combos: list, batch: int, size: int) -> np.ndarray:
    """(B, 3, size, size) float32 in [-1, 1]: random trained combinations, rendered."""
    from ldm.demo.shapes import render

    picks = rng.integers(0, len(combos), size=batch)
    arr = np.stack([np.asarray(render(*combos[k], size=size, rng_or_seed=rng)) for k in picks])
    return (arr.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def train_vae(folder: str, steps: int = 600, batch_size: int = 8, learning_rate: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0, size: int = RESOLUTION, train_size: int = 64,
              log_every: int = 100) -> dict:
    """Train DEMO_VAE on rendered trained-combination shapes (Adam, cosine decay, L1 + L2 + kl_weight
    x KL) at train_size px (the network is convolutional: 64 px shapes train it 4x faster than
    128 px ones, and it is checked at `size`), set its scaling_factor from the latents' std, save it to <folder>/ (config.json +
    diffusion_paddle_model.safetensors). Returns {"l1": final mean |x - x'| on a held batch,
    "scaling_factor": ...}."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    import paddle
    from ppdiffusers import AutoencoderKL

    from ldm.demo.shapes import combinations

    paddle.seed(seed)
    rng = np.random.default_rng([seed, 0xAE])
    combos = combinations(held_out=False)
    vae = AutoencoderKL(**DEMO_VAE)
    with paddle.no_grad():  # start nearly deterministic: posterior log-variance -8 (std 0.02)
        w, b = vae.quant_conv.weight, vae.quant_conv.bias  # (2C, 2C, 1, 1), (2C,): mean channels, then logvar
        c = DEMO_VAE["latent_channels"]
        w.set_value(paddle.concat([w[:c], paddle.zeros_like(w[c:])]))
        b.set_value(paddle.concat([b[:c], paddle.full_like(b[c:], LOGVAR_INIT)]))
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate, T_max=steps)
    opt = paddle.optimizer.Adam(learning_rate=schedule, parameters=vae.parameters())
    vae.train()
    for step in range(1, steps + 1):
        x = paddle.to_tensor(_shape_batch(rng, combos, batch_size, train_size))
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        l1 = (rec - x).abs().mean()
        loss = l1 + ((rec - x) ** 2).mean() + kl_weight * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
        schedule.step()
        if step % log_every == 0 or step == steps:
            logger.info("vae step %d/%d loss %.4f l1 %.4f", step, steps, float(loss), float(l1))
    vae.eval()
    check = np.random.default_rng([seed, 0xAF])
    with paddle.no_grad():
        zs, l1s = [], []
        for _ in range(4):
            x = paddle.to_tensor(_shape_batch(check, combos, 8, size))
            z = vae.encode(x).latent_dist.mode()
            l1s.append(float((vae.decode(z).sample.clip(-1, 1) - x).abs().mean()))
            zs.append(z.numpy())
    scaling = float(1.0 / np.concatenate(zs).std())
    vae.register_to_config(scaling_factor=scaling)
    save_model(vae, folder, "diffusion_paddle_model.safetensors", "sd_vae")
    return {"l1": float(np.mean(l1s)), "scaling_factor": scaling}


def check_folder(folder: Optional[str] = None) -> str:
    """folder (default: the shipped demo) if it holds the five SD parts, else FileNotFoundError
    naming the rebuild command."""
    folder = folder or demo_sd_dir()
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not os.path.isdir(os.path.join(folder, p))]
    if missing:
        raise FileNotFoundError(f"demo SD weights missing in {folder} ({', '.join(missing)}); rebuild them with "
                                "`sh scripts/train_demo_sd.sh`")
    return folder
