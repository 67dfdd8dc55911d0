"""Datasets, transforms and offline data preparation."""
