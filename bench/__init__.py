"""Benchmarks of xblip_jax against the PyTorch reference (see bench/README.md)."""
