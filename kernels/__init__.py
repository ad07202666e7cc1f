"""Triton kernels, installed as ``fastgan.kernels``.

Every launcher takes tensors on any device triton can run on: CUDA, or the CPU
under ``TRITON_INTERPRET=1`` (set before this package is imported).
"""
import triton  # noqa: F401  (fail at import when triton is missing, so backends() can say so)
