"""Compiled CPU kernels for the sampler's decode step (cpu_decode.py builds and registers them)."""
