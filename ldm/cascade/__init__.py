"""Stable Cascade (Wuerstchen v3) networks and diffusion pieces for PaddlePaddle.

Import submodules directly (`from ldm.cascade.stage_c import StageC`); this package file stays
free of heavy imports.
"""
