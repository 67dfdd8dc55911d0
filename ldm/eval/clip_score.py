"""CLIP score: how well images match their captions.

Definition (torchmetrics `CLIPScore`, Hessel et al. 2021 "CLIPScore"): for each (image, caption)
pair, 100 * max(cos(image_embeds, text_embeds), 0), averaged over the pairs; the embeddings are the
projected CLIP image / text features. PaddleMIX's `fid_clip_score` uses ViT-B/32
(openai/clip-vit-base-patch32).

The towers are the project's CLIP loaders (ldm.clip): a text folder (config.json, Paddle-layout
weights, vocab.json + merges.txt) and a vision folder, as scripts/convert_other_weight.py
--clip_text_dir / --clip_image_dir write them from a transformers CLIPModel folder (both flags may
name the same CLIPModel folder). Images are preprocessed by `ldm.clip.clip_image_preprocess`
(bicubic antialiased short-side resize to the tower's image size, centre crop, CLIP mean/std);
captions are truncated at the tokenizer's 77 tokens.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ldm.eval.images import to_float_chw

__all__ = ["ClipScorer", "clip_score_from_embeds", "CLIP_TEXT_SUBDIR", "CLIP_VISION_SUBDIR"]

CLIP_TEXT_SUBDIR, CLIP_VISION_SUBDIR = "clip_text", "clip_image"  # what the converter's --output_dir holds


def clip_score_from_embeds(image_embeds, text_embeds) -> np.ndarray:
    """Per-pair 100 * max(cos, 0) of (N, D) image and text embeddings (float64)."""
    a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"embeddings must be two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return 100.0 * np.maximum(cos, 0.0)


class ClipScorer:
    """CLIP text + vision towers with projections (see the module docstring).

    `ClipScorer(text_dir, vision_dir)`, or `ClipScorer.from_dir(d)` for the converter's output
    folder (d/clip_text, d/clip_image). `scores(images, captions)` -> (N,) per-pair scores."""

    def __init__(self, text_dir, vision_dir, dtype: str = "float32"):
        from ldm.clip import load_clip_text, load_clip_vision, load_tokenizer

        self.text_dir, self.vision_dir = os.fspath(text_dir), os.fspath(vision_dir)
        self.tokenizer = load_tokenizer(self.text_dir)
        self.text = load_clip_text(self.text_dir, dtype)
        self.vision = load_clip_vision(self.vision_dir, dtype)
        self.dtype = dtype
        if self.text.config.projection_dim != self.vision.config.projection_dim:
            raise ValueError(f"{text_dir} projects to {self.text.config.projection_dim} dimensions, {vision_dir} to "
                             f"{self.vision.config.projection_dim}: not the two towers of one CLIP model")

    @classmethod
    def from_dir(cls, folder, dtype: str = "float32") -> "ClipScorer":
        return cls(os.path.join(folder, CLIP_TEXT_SUBDIR), os.path.join(folder, CLIP_VISION_SUBDIR), dtype)

    def text_embeds(self, captions: Sequence[str]) -> np.ndarray:
        import paddle

        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        with paddle.no_grad():
            out = self.text(input_ids=paddle.to_tensor(np.asarray(ids, np.int64)), return_dict=True)
        return out.text_embeds.astype("float32").numpy()

    def image_embeds(self, images) -> np.ndarray:
        """images: uint8 (H, W, 3) RGB arrays, any sizes (each is preprocessed on its own)."""
        import paddle

        from ldm.clip import clip_image_preprocess
    
        size = self.vision.config.image_size
        with paddle.no_grad():
            pix = paddle.concat([
                clip_image_preprocess(paddle.to_tensor(to_float_chw(im)[None]), size=size) for im in images])
            out = self.vision(pixel_values=pix.astype(self.dtype), return_dict=True)
        return out.image_embeds.astype("float32").numpy()

    def scores(self, images, captions: Sequence[str]) -> np.ndarray:
        captions = list(captions)
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        return clip_score_from_embeds(self.image_embeds(images), self.text_embeds(captions))
