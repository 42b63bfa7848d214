"""Offline calibration (installed as vllm_aquakv.calibration)."""
