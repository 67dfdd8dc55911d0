"""Training on top of the PaddleNLP Trainer: one task base, the recipes, and their Trainer.

- `task.py`: `TrainingTask`, the base Layer of every recipe (frozen parts, trainable selection,
  EMA parameters, per-rank RNG state, saving / loading trained weights, preview hooks).
- `stage_c.py`, `sd.py`: the recipes (arguments, a task subclass with its parts and its step, the
  builder). A new recipe (Stage B, a LoRA run) is one more module of the same shape: subclass
  `TrainingTask`, `add_frozen` / `add_trained` its networks, write `forward` (the step), and
  override `write_part` / `read_part` if its weights have their own file format.
- `trainer.py`: `DiffusionTrainer` (PaddleNLP's public extension points only: `compute_loss`,
  `get_train_dataloader`, `log`, the `_save` / `_load_from_checkpoint` hooks, callbacks).
- `checkpoint.py`: what a checkpoint holds beyond the weights (optimizer, scheduler, RNG and task
  state as safetensors / JSON), completeness marker, resume and rotation.
- `callbacks.py`: EMA, image logging, timing; `optim.py`: parameter groups; `args.py`: shared flags.

Wiring (see train_stage_c_trainer.py):
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    callbacks, ema = standard_callbacks(args, image_kwargs)
    trainer = DiffusionTrainer(model=task, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.set_optimizer_grouped_parameters(list(task.trainable_parameters().values()))
    trainer.train(resume_from_checkpoint=resume)
"""
