"""Latent diffusion toolkit for PaddlePaddle: Stable Cascade (Wuerstchen v3) and Stable Diffusion v1."""
__version__ = "0.1.0"
