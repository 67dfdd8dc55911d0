"""Stable Cascade (Wuerstchen v3): networks, GDF, sampling and loading, in Paddle.

Import submodules directly (`from ldm.cascade.stage_c import StageC`); this file stays free of
imports. Who imports whom (tests/test_import_graph.py keeps it so):

    networks    common.py (blocks), attention.py (the one attention function), cpu_kernels.py
                (the CPU fast paths behind one switch), stage_a.py, stage_b.py, stage_c.py,
                effnet.py, previewer.py: nn.Layers plus their frozen config dataclasses and named
                presets; they know nothing of files, training or data
    keys.py     key tables of the original / diffusers / PaddleMIX layouts, registered in ldm.weights
    loading.py  networks from weight files (load_stage_c, ...), convert.py the converters
    gdf/        schedules, scalers, targets, noise conditions, loss weights, samplers
    pipeline.py sampling of stages C -> B -> A with guidance; components.py the lazily built
                networks of a run (from files or a preset), presets.py the offline tiny preset,
                settings.py the run defaults (the top-level config.py chooses among them)

Where to add:
- a sampler: a class in gdf/samplers.py (the `step` of DDIMSampler is the model) and its name in
  `gdf.samplers.SAMPLERS`; `SamplingConfig(sampler=<name>)` selects it.
- an adapter (LoRA, ...): wrap the target `nn.Linear` / `nn.Conv2D` by replacing the attribute on
  its parent layer; every block calls its sub-layers, so the wrapper runs (tests/test_blocks.py).
  Training only the adapter is `TrainingTask.select_trainable` (ldm/train/task.py).
- a network size: a named preset in the network's `*_PRESETS` table.
"""
