"""Tiny Stable Diffusion v1 components for the SD tests: ldm.sd.tiny (build_tiny_sd is
ldm.sd.tiny.write_tiny_sd with backend="torch": diffusers/transformers-layout folders, which the
diffusers parity tests rely on), plus write_images_jsonl, a small synthetic image set.
"""
import json
import os

from ldm.sd.tiny import SCHEDULER, TINY_CLIP, TINY_UNET, TINY_VAE, write_tokenizer  # noqa: F401  (re-exported)
from ldm.sd.tiny import write_tiny_sd


def build_tiny_sd(folder, unet_weights=False, seed=0, backend="torch"):
    """ldm.sd.tiny.write_tiny_sd, torch (diffusers layout) by default."""
    return write_tiny_sd(folder, unet_weights=unet_weights, seed=seed, backend=backend)


def write_images_jsonl(folder, n=12, size=24, seed=0):
    """n small PNGs (distinct solid colours + noise) and a coco-style jsonl naming them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            base = rng.integers(0, 256, size=3)
            img = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype("uint8")
            name = f"images/img{i:03d}.png"
            Image.fromarray(img).save(os.path.join(folder, name))
            f.write(json.dumps({"caption": f"record {i:03d}", "image": name}) + "\n")
    return path
