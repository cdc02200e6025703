"""Build a model from a local source: read its config, construct the SPMD module tree for
this rank (the placement compiler runs inside), load this rank's weight shards."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from agentspeed.config import EngineConfig, ModelConfig
from agentspeed.errors import ModelLoadError
from agentspeed.kernels.api import KernelSet
from agentspeed.model_source import ModelSource, resolve_model
from agentspeed.modeling.comm import Communicator
from agentspeed.modeling.layers.weights import LazyTensor
from agentspeed.modeling.loaders import gguf_loader, safetensors_loader
from agentspeed.modeling.models.base import CausalLM
from agentspeed.modeling.models.registry import model_class

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class BuiltModel:
    model: CausalLM
    config: ModelConfig
    source: ModelSource
    dtype: torch.dtype
    device: str
    kernels: KernelSet


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str, checkpoint: torch.dtype | None) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unsupported dtype {dtype!r}; choose from auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device == "cpu":
        return torch.float32  # no bf16 hardware on our CPUs: fp32 is the fast path
    return checkpoint if checkpoint in (torch.bfloat16, torch.float16) else torch.bfloat16


def load_weights(model: CausalLM, tensors: Iterable[tuple[str, LazyTensor]], total: int) -> None:
    loaded: set[str] = set()
    ignored = 0
    for name, t in tqdm(tensors, total=total, desc="loading weights", unit="tensor", disable=None, leave=False):
        target = model.targets.get(name)
        if target is None:
            ignored += 1
            continue
        mod, param, part = target
        try:
            mod.load(param, t, part)  # type: ignore[operator]
        except ValueError as e:
            raise ModelLoadError(f"weight {name}: {e}") from None
        loaded.add(name)
    missing = model.missing_weights(loaded)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ModelLoadError(f"checkpoint lacks weights: {', '.join(missing[:3])}{more}")
    if ignored:
        log.info("ignored %d checkpoint tensors this model does not use", ignored)


def build_model(cfg: EngineConfig, comm: Communicator) -> BuiltModel:
    """Raises ModelLoadError (one line) for a missing path, corrupt file or unsupported model."""
    t0 = time.perf_counter()
    source = resolve_model(cfg.model)
    device = resolve_device(cfg.device)
    if source.format == "gguf":
        reader = gguf_loader.open_gguf(source.path)
        mcfg = gguf_loader.gguf_model_config(reader)
        checkpoint_dtype = None
    else:
        mcfg = safetensors_loader.read_model_config(source.path)
        checkpoint_dtype = safetensors_loader.checkpoint_dtype(source.path)
    dtype = resolve_dtype(cfg.dtype, device, checkpoint_dtype)
    traits = {
        "head_dim": mcfg.head_dim,
        "page_size": cfg.cache.page_size,
        "kv_cache_dtype": cfg.cache.kv_cache_dtype,
        "mla": mcfg.mla is not None,
    }
    if mcfg.mla is not None:
        traits.update(kv_lora_rank=mcfg.mla.kv_lora_rank, qk_rope_head_dim=mcfg.mla.qk_rope_head_dim)
    kernels = KernelSet(device, dtype, traits, cfg.kernels)
    cls = model_class(mcfg.architecture)
    try:
        model = cls(mcfg, comm, kernels, dtype, device)
    except ValueError as e:  # e.g. heads not divisible by --tp
        raise ModelLoadError(f"cannot shard {source.name}: {e}") from None
    assert isinstance(model, CausalLM)
    if source.format == "gguf":
        for qtype, n in gguf_loader.widened_types(reader).items():
            log.warning("%d %s tensors have no native kernel: dequantized to fp32 at load (4 bytes per "
                        "weight instead of the file's)", n, qtype)
        load_weights(model, gguf_loader.iter_gguf(reader, mcfg), gguf_loader.count_tensors(reader))
    else:
        total = safetensors_loader.count_safetensors(source.path)
        load_weights(model, safetensors_loader.iter_safetensors(source.path), total)
    model.eval()
    for m in model.modules():  # weights into the layout the selected kernels take, once
        prepare = getattr(m, "prepare_weights", None)
        if prepare is not None:
            prepare(kernels)
    if device == "cpu":
        from agentspeed.modeling.fused_decode import FusedDecode

        model.fused_decode = FusedDecode.of(model)
    for line in kernels.describe_variants():
        log.info("kernels of %s", line)
    for kind, (n, nbytes) in kernels.widened.items():
        log.warning("%d packed %s weights dequantized for linear backend %s: +%.0f MiB resident",
                    n, kind, kernels.backends["linear"], nbytes / 2**20)
    log.info(
        "loaded %s (%s, %d layers) as %s on %s, tp rank %d/%d, in %.1fs; kernels: %s",
        source.name, mcfg.architecture, mcfg.num_layers, str(dtype).removeprefix("torch."),
        device, comm.rank, comm.world_size, time.perf_counter() - t0, kernels.describe(),
    )
    return BuiltModel(model, mcfg, source, dtype, device, kernels)
