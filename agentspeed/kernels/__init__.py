"""Kernels: the public op API (`agentspeed.kernels.api`), the registry and its backends.
Importing this package registers every backend available in this environment."""

from agentspeed.kernels import cpu, cpu_mla, cpu_native, reference, triton  # noqa: F401  (registers backends)
from agentspeed.kernels.api import AttentionMetadata, KernelSet, SamplingTensors
from agentspeed.kernels.registry import register_kernel, select_kernel

__all__ = ["AttentionMetadata", "KernelSet", "SamplingTensors", "register_kernel", "select_kernel"]
