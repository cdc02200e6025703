"""Kernel registry: backends register implementations of public ops; selection filters by
device, dtype and traits and takes the highest priority, unless a backend is forced.

The registry is a process-wide table filled at import time (like a plugin table); it holds
no configuration. Overrides come in through `select_kernel(force=...)`, from KernelConfig.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from agentspeed.errors import KernelUnavailableError

Traits = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class KernelImpl:
    op: str
    backend: str
    fn: Callable[..., Any]
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    priority: int
    supports: Callable[[Traits], bool] | None
    # Optional one-time transform of a weight into the layout `fn` takes (e.g. a prepacked
    # oneDNN matrix); identity when None. Callers apply it once, at model build.
    prepare: Callable[[torch.Tensor], Any] | None = None
    # For `linear`: set by backends that read packed ggml weights (kernels/ggml.py) as they
    # are stored; it looks up embedding rows of such a weight, (GgmlWeight, ids) -> fp32 rows.
    # Other backends are handed those weights dequantized.
    packed_rows: Callable[..., torch.Tensor] | None = None
    # For `linear` backends reading packed weights: (a layer's prepared expert weights, gate|up
    # and down per expert, their biases or None, GPT-OSS's (swiglu limit, alpha) or None) -> a
    # fused routed-experts call (x, ids, weights) -> y for steps of any size, or None where
    # those experts do not suit it (kernels/cpu_ggml.py).
    packed_moe: Callable[..., Any] | None = None

    def why_not(self, device: str, dtype: torch.dtype, traits: Traits) -> str | None:
        """None if this implementation can run here, else the reason it cannot."""
        if device not in self.devices:
            return f"device {device!r} not in {sorted(self.devices)}"
        if dtype not in self.dtypes:
            return f"dtype {dtype} not supported"
        if self.supports is not None and not self.supports(traits):
            return f"traits {dict(traits)} not supported"
        return None


_REGISTRY: dict[str, dict[str, KernelImpl]] = {}
# (op, backend) -> why that backend could not register here (e.g. a native build failed), so
# forcing it says why instead of only "does not implement".
_UNAVAILABLE: dict[tuple[str, str], str] = {}


def register_kernel(
    op: str,
    backend: str,
    devices: Iterable[str],
    dtypes: Iterable[torch.dtype],
    priority: int = 0,
    supports: Callable[[Traits], bool] | None = None,
    prepare: Callable[[torch.Tensor], Any] | None = None,
    packed_rows: Callable[..., torch.Tensor] | None = None,
    packed_moe: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn` as `backend`'s implementation of `op`.

    Registering the same (op, backend) twice is an error: it would silently shadow one.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        impls = _REGISTRY.setdefault(op, {})
        if backend in impls:
            raise ValueError(f"kernel {op!r} already has a {backend!r} backend")
        impls[backend] = KernelImpl(
            op, backend, fn, frozenset(devices), frozenset(dtypes), priority, supports, prepare, packed_rows,
            packed_moe,
        )
        return fn

    return deco


def register_unavailable(op: str, backend: str, reason: str) -> None:
    """Record that `backend` exists for `op` but cannot run on this machine, and why."""
    _UNAVAILABLE[(op, backend)] = reason


def unavailable_reason(op: str, backend: str) -> str | None:
    return _UNAVAILABLE.get((op, backend))


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def backends_for(op: str) -> list[KernelImpl]:
    """All implementations of `op`, highest priority first."""
    return sorted(_REGISTRY.get(op, {}).values(), key=lambda k: -k.priority)


def select_kernel(
    op: str,
    device: str,
    dtype: torch.dtype,
    traits: Traits | None = None,
    force: str | None = None,
) -> KernelImpl:
    """The implementation to use for `op` here.

    With `force`, that backend or a KernelUnavailableError saying why it cannot run; never a
    silent fallback. Without, the highest-priority backend that supports device, dtype and
    traits (every op has a `reference` backend that runs everywhere).
    """
    traits = traits or {}
    impls = _REGISTRY.get(op)
    if not impls:
        raise KernelUnavailableError(f"unknown kernel op {op!r}")
    if force is not None:
        impl = impls.get(force)
        if impl is None:
            reason = _UNAVAILABLE.get((op, force))
            if reason is not None:
                raise KernelUnavailableError(f"kernel backend {force!r} for {op!r} is unavailable here: {reason}")
            raise KernelUnavailableError(
                f"kernel backend {force!r} does not implement {op!r} (has: {sorted(impls)})"
            )
        reason = impl.why_not(device, dtype, traits)
        if reason:
            raise KernelUnavailableError(f"forced backend {force!r} cannot run {op!r}: {reason}")
        return impl
    for impl in backends_for(op):
        if impl.why_not(device, dtype, traits) is None:
            return impl
    raise KernelUnavailableError(f"no backend can run {op!r} on {device}/{dtype} with {traits}")
