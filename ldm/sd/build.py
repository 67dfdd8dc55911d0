"""Builds the pieces of `train_txt2img_laion400m_trainer.py` from its parsed arguments."""
from __future__ import annotations

import json
import os

from ldm.sd.loading import (load_scheduler_config, load_text_encoder, load_tokenizer, load_unet, load_vae,
                            resolve_paths)
from ldm.sd.model import DEFAULT_VALIDATION_PROMPTS, StableDiffusionModel
from ldm.train.callbacks import standard_callbacks
from ldm.train.optim import build_param_groups
from ldm.utils import get_logger

logger = get_logger("ldm.sd.build")

__all__ = ["build_model", "build_dataset", "build_callbacks", "build_param_groups_for", "resume_step"]


def build_model(model_args, training_args, caption_dropout: float = 0.0) -> StableDiffusionModel:
    """The SD Layer; `caption_dropout` is `--caption_drop_prob` (applied in the training step)."""
    paths = resolve_paths(model_args)
    pre = model_args.pretrained_model_name_or_path
    if model_args.unet_name_or_path and pre:
        logger.info("--unet_name_or_path %s takes precedence over %s/unet", model_args.unet_name_or_path, pre)
    unet = load_unet(paths.unet)
    vae, text_encoder = load_vae(paths.vae), load_text_encoder(paths.text_encoder)
    tokenizer = load_tokenizer(paths.tokenizer, model_args.model_max_length)
    if training_args.recompute:
        unet.enable_gradient_checkpointing()
        logger.info("recompute: gradient checkpointing on the UNet")
    if training_args.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
            logger.info("memory-efficient attention enabled")
        except (NotImplementedError, ValueError, ImportError, RuntimeError) as e:
            logger.warning("memory-efficient attention unavailable here (%s); using standard attention", e)
    return StableDiffusionModel(
        unet, vae, text_encoder, tokenizer, scheduler_config=load_scheduler_config(paths.scheduler),
        prediction_type=model_args.prediction_type, noise_offset=model_args.noise_offset,
        input_perturbation=model_args.input_perturbation, snr_gamma=model_args.snr_gamma,
        train_text_encoder=model_args.train_text_encoder, caption_dropout=caption_dropout,
        seed=training_args.seed, rank=max(training_args.process_index, 0),
    )


def resume_step(checkpoint: str | None) -> int:
    if not checkpoint:
        return 0
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return int(json.load(f)["global_step"])


def build_dataset(data_args, training_args, start_step: int = 0):
    """The `--file_list` stream (ldm.data kind "laion", pixels in [-1, 1], raw captions)."""
    import ldm.data

    spec = ldm.data.DatasetSpec("laion", data_args.file_list, resolution=data_args.resolution,
                                center_crop=data_args.center_crop, random_flip=data_args.random_flip,
                                seed=training_args.seed, options={"infinite": True})
    ds = ldm.data.build_dataset(spec)
    ds.set_epoch(start_step)  # a resumed run reads a fresh stream instead of replaying consumed batches
    return ds


def build_param_groups_for(model, training_args):
    return build_param_groups(
        model.param_groups(),
        {"unet": training_args.unet_learning_rate, "text_encoder": training_args.text_encoder_learning_rate},
        base_learning_rate=training_args.learning_rate, weight_decay=training_args.weight_decay,
    )


def build_callbacks(model_args, data_args, training_args):
    image_kwargs = dict(prompts=tuple(training_args.validation_prompts or DEFAULT_VALIDATION_PROMPTS),
                        num_inference_steps=model_args.num_inference_steps, seed=training_args.seed,
                        resolution=data_args.resolution)
    return standard_callbacks(training_args, image_kwargs)
