"""Triton kernels (installed as vllm_aquakv.kernels)."""
