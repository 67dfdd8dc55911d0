"""Model-agnostic training pieces on top of the PaddleNLP Trainer (used by the SD v1 trainer,
reusable by the Stable Cascade trainers).

Model contract (a paddle Layer):
- `forward(**batch) -> loss` (scalar); extra batch keys (e.g. "caption") must be accepted.
- optional `save_trained(dir, only_updated: bool)` / `load_trained(dir)`: what a checkpoint holds
  (without them the Trainer's state-dict files are used).
- optional `param_groups() -> {group: [(name, param)]}` for `optim.build_param_groups`.
- for `EMACallback`: `ema_parameters() -> {name: param}`; optional `save_ema(dir, shadow)` /
  `load_ema(dir) -> {name: ndarray} | None` (default: `ema.safetensors` in the checkpoint).
- for `ImageLoggingCallback`: `log_images(pixel_values=..., **kwargs) -> {tag: uint8 HxWx3}`.

Wiring (see train_txt2img_laion400m_trainer.py):
    callbacks = [TimingCallback(samples_per_step), EMACallback(decay), ImageLoggingCallback(every, kwargs),
                 CheckpointMarkerCallback()]                      # the marker callback LAST
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    args.resume_from_checkpoint = resume                         # EMACallback restores from it
    trainer = DiffusionTrainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.set_optimizer_grouped_parameters(build_param_groups(model.param_groups(), lrs, base_lr, wd))
    trainer.train(resume_from_checkpoint=resume)
"""
