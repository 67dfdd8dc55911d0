"""Latent diffusion toolkit for PaddlePaddle: Stable Cascade (Wuerstchen v3) and Stable Diffusion v1.

    cascade/   Stable Cascade networks, GDF, sampling, loading (see its docstring)
    sd/        Stable Diffusion v1 on ppdiffusers: loading, sampling, export
    clip.py    the CLIP text / vision encoders and tokenizer both families use
    configs.py the frozen network-config base class
    weights/   the one weights stack (reader, strict assigner, atomic writer, metadata schema)
    data/      datasets behind one interface (DatasetSpec -> build_dataset), transforms, preparation
    train/     the training task base, the recipes (Stage C, SD) and the PaddleNLP Trainer subclass
    eval/      FID and CLIP score
    model_c.py, model_b.py   the seed's public API (ModelC, ModelB)

`ldm` never imports the top-level `config.py`; the entry points read it and pass values in.
"""
__version__ = "0.2.0"
