"""The public op API.

Ops (each has a torch `reference` backend that runs everywhere):
  linear(x, w, bias) -> Tensor                    x @ w.T + bias, with w as returned by
                                                  `KernelSet.linear_prepare(weight)` (done
                                                  once at build: a backend may repack it or
                                                  wrap it in its own object). A weight that
                                                  came packed (kernels/ggml.GgmlLinear) stays
                                                  packed for backends registered with
                                                  `packed_rows`; others get it dequantized
  rms_norm(x, weight, eps) -> Tensor
  rotary_embedding(q, k, cos_sin) -> (q, k)       NeoX-style; cos_sin [T, rot]: each token's
                                                  cos|sin (gathered once per forward)
  silu_and_mul(x, out=None) -> Tensor                         silu(x[..., :d]) * x[..., d:]; into out
                                                  if given, which may be x[..., :d] (in place)
  store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None
                                                  writes new tokens' K/V in place
  paged_attention_prefill(q, k_cache, v_cache, meta, scale, k_scale=None, v_scale=None, window=None, sinks=None)
  paged_attention_decode(q, k_cache, v_cache, meta, scale, k_scale=None, v_scale=None, window=None, sinks=None)
                                                  -> [T, H, D]; sequences have 1 to
                                                  MAX_DECODE_QUERY query tokens (a decode, or
                                                  one verifying speculative drafts), causal;
                                                  with `window`, a token at position p sees
                                                  keys in (p - window, p] (a backend without
                                                  windows declines the `sliding_window` trait);
                                                  sinks [H]: a per-head logit in every softmax's
                                                  denominator (trait `attention_sinks`)
  sample(logits, params) -> Tensor[int64]

Multi-head latent attention (DeepSeek-V2/V3). The cache holds one row per token,
[latent (kv_lora_rank) | roped shared key (rope_dim)]:
  store_mla_kv(latent, kv_cache, slot_mapping, kv_scale=None) -> None
  mla_decode(q, kv_cache, meta, scale, lora_rank, kv_scale=None) -> [T, H, lora_rank]
      absorbed form: q [T, H, lora_rank + rope_dim] is [q_nope @ W_UK | q_pe]; scores are
      q . row, values are row[:lora_rank]; the caller projects the output with W_UV.
      Sequences may have several query tokens (speculative verification), causal as below.
  mla_prefill(q_nope, q_pe, kv_cache, w_kv_b, meta, scale, kv_scale=None) -> [T, H, v_dim]
      expanded form: each sequence's latent context is up-projected by
      w_kv_b [H, nope_dim + v_dim, lora_rank] into per-head K/V.

Shapes: q [T, H, D]; k/v [T, KVH, D]; caches [num_pages, page_size, KVH, D] (MLA:
[num_pages, page_size, lora_rank + rope_dim]); tokens of all sequences are flattened along T
in sequence order (no padding). fp8 caches (float8_e4m3fn) carry per-token float32 scales
[num_pages, page_size]: stored value * scale = the original. `KernelSet` resolves every op
once for a model so hot paths make no per-call registry lookups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agentspeed.config import KernelConfig
from agentspeed.errors import KernelUnavailableError
from agentspeed.kernels.registry import Traits, select_kernel

OPS = (
    "linear",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
    "paged_attention_prefill",
    "paged_attention_decode",
    "store_mla_kv",
    "mla_decode",
    "mla_prefill",
    "sample",
)


# Sequences with at most this many new tokens are "decode-like": one token plus up to 7
# speculative drafts to verify. Decode kernels read each K/V row once for all of them.
MAX_DECODE_QUERY = 8


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where each sequence's tokens and KV live for one forward.

    Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1]; its context (cached
    prefix plus new tokens) is seq_lens[b] tokens stored in pages page_table[b, :]. New token t
    is written to flat cache slot slot_mapping[t] (page * page_size + offset). A query row i of
    sequence b sits at position seq_lens[b] - query_len[b] + i and attends causally.
    The *_cpu tuples mirror the tensors on the host so kernels can plan without a sync.
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    page_table: torch.Tensor  # [B, max_pages] int32
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]
    page_size: int
    pages_cpu: tuple[Sequence[int], ...] = ()  # per sequence, its pages (host copy of page_table)

    # For a mixed batch that starts with decode-like sequences (at most MAX_DECODE_QUERY
    # tokens): (their number of query rows, their metadata, the rest's metadata), so attention
    # can run the decode kernel on those rows; None otherwise. Built once per forward by `with_decode_split`.
    decode_split: tuple[int, AttentionMetadata, AttentionMetadata] | None = None

    @property
    def is_decode(self) -> bool:
        """Every sequence is decode-like (at most MAX_DECODE_QUERY query tokens)."""
        return max(self.query_lens_cpu) <= MAX_DECODE_QUERY

    def _part(self, lo: int, hi: int) -> AttentionMetadata:
        q0 = sum(self.query_lens_cpu[:lo])
        q1 = q0 + sum(self.query_lens_cpu[lo:hi])
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[q0:q1],
            query_start_loc=self.query_start_loc[lo : hi + 1] - q0,
            seq_lens=self.seq_lens[lo:hi],
            page_table=self.page_table[lo:hi],
            query_lens_cpu=self.query_lens_cpu[lo:hi],
            seq_lens_cpu=self.seq_lens_cpu[lo:hi],
            page_size=self.page_size,
            pages_cpu=self.pages_cpu[lo:hi],
        )

    def with_decode_split(self) -> AttentionMetadata:
        """This metadata with `decode_split` filled in when the batch is mixed and leads with
        decode-like sequences (the scheduler puts decodes first)."""
        nd = 0
        for n in self.query_lens_cpu:
            if n > MAX_DECODE_QUERY:
                break
            nd += 1
        if nd == 0 or nd == len(self.query_lens_cpu):
            return self
        n = len(self.query_lens_cpu)
        rows = sum(self.query_lens_cpu[:nd])
        return dataclasses.replace(self, decode_split=(rows, self._part(0, nd), self._part(nd, n)))

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu)


@dataclass(frozen=True, slots=True)
class SamplingTensors:
    """Per-row sampling settings for one batched `sample` call.

    temperature 0 means greedy for that row; top_k 0, top_p 1 and min_p 0 mean off. A row with a
    generator draws only from it, so its samples do not depend on the rest of the batch.
    """

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    min_p: torch.Tensor  # [B] float32
    generators: tuple[torch.Generator | None, ...]
    all_greedy: bool
    use_top_p: bool
    use_top_k: bool
    use_min_p: bool = False


def resolve_overrides(config: KernelConfig) -> dict[str, str]:
    """op -> forced backend (the environment was read when the config was built:
    KernelConfig.from_spec)."""
    return dict(config.overrides)


class KernelSet:
    """Every op resolved once for (device, dtype, traits)."""

    def __init__(
        self,
        device: str,
        dtype: torch.dtype,
        traits: Traits | None = None,
        config: KernelConfig | None = None,
    ) -> None:
        overrides = resolve_overrides(config or KernelConfig())
        blanket = overrides.get("*")
        if blanket is not None and not any(_implements(blanket, op) for op in OPS):
            raise KernelUnavailableError(f"unknown kernel backend {blanket!r}")
        unknown = set(overrides) - {"*", *OPS}
        if unknown:
            raise KernelUnavailableError(f"unknown kernel op(s) in override: {', '.join(sorted(unknown))}")
        self.dtype = dtype
        self._args = (device, dtype, dict(traits or {}), config)
        self._variants: dict[tuple[tuple[str, Any], ...], KernelSet] = {}
        self.packed_rows: Callable[..., torch.Tensor] | None = None
        self.packed_moe: Callable[..., Any] | None = None  # see KernelImpl.packed_moe
        self.backends: dict[str, str] = {}
        self._fns: dict[str, Callable[..., Any]] = {}
        self._prepare: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {}
        self._notes: dict[str, int] = {}  # numerics note of prepared weights -> how many
        self.widened: dict[str, list[int]] = {}  # packed type -> [weights, fp32 bytes] dequantized
        for op in OPS:
            force = overrides.get(op, overrides.get("*"))
            # A blanket "*" override applies to the ops that backend implements;
            # a per-op override must be honoured or fail.
            if force is not None and op not in overrides and not _implements(force, op):
                force = None
            # Sampling runs on fp32 logits whatever the model dtype.
            op_dtype = torch.float32 if op == "sample" else dtype
            impl = select_kernel(op, device, op_dtype, traits, force)
            self.backends[op] = impl.backend
            self._fns[op] = impl.fn
            self._prepare[op] = impl.prepare
            if op == "linear":
                # Embedding rows of packed weights, where this linear reads them packed.
                self.packed_rows = impl.packed_rows
                self.packed_moe = impl.packed_moe
        self.linear = self._fns["linear"]
        self.rms_norm = self._fns["rms_norm"]
        self.rotary_embedding = self._fns["rotary_embedding"]
        self.silu_and_mul = self._fns["silu_and_mul"]
        self.store_kv = self._fns["store_kv"]
        self.paged_attention_prefill = self._fns["paged_attention_prefill"]
        self.paged_attention_decode = self._fns["paged_attention_decode"]
        self.store_mla_kv = self._fns["store_mla_kv"]
        self.mla_decode = self._fns["mla_decode"]
        self.mla_prefill = self._fns["mla_prefill"]
        self.sample = self._fns["sample"]

    def variant(self, **traits: Any) -> KernelSet:
        """The kernel set for these traits on top of this one's (e.g. the sliding-window
        layers of a model whose other layers keep kernels without windows); made once each."""
        key = tuple(sorted(traits.items()))
        if key not in self._variants:
            device, dtype, base, config = self._args
            self._variants[key] = KernelSet(device, dtype, {**base, **traits}, config)
        return self._variants[key]

    def describe_variants(self) -> list[str]:
        """One line per variant whose backends differ from this set's, for the load log."""
        out = []
        for key, ks in self._variants.items():
            diff = {op: b for op, b in ks.backends.items() if self.backends.get(op) != b}
            if diff:
                what = ", ".join(f"{k}={v}" for k, v in key)
                out.append(f"layers with {what}: " + ", ".join(f"{op}: {b}" for op, b in diff.items()))
        return out

    def linear_prepare(self, weight: Any) -> Any:
        """The weight in the layout `self.linear` takes (the same tensor if no repacking). A
        prepared form whose products are not plain `dtype` arithmetic says so in a
        `numerics_note` attribute, collected for `numerics_notes`."""
        from agentspeed.kernels.ggml import GgmlLinear

        if isinstance(weight, GgmlLinear) and self.packed_rows is None:
            weight = self.widen(weight)
        prep = self._prepare["linear"]
        out = weight if prep is None else prep(weight)
        note = getattr(out, "numerics_note", None)
        if note:
            self._notes[note] = self._notes.get(note, 0) + 1
        return out

    def widen(self, weight: Any) -> torch.Tensor:
        """A packed weight (GgmlLinear) as a dense tensor of this set's dtype, counted in
        `widened` for the load log (it costs memory and bandwidth the packed form does not)."""
        dense = weight.dequantize().to(self.dtype)
        entry = self.widened.setdefault(weight.describe(), [0, 0])
        entry[0] += 1
        entry[1] += dense.numel() * dense.element_size()
        return dense

    def numerics_notes(self) -> list[str]:
        """One line per kind of prepared linear that departs from plain arithmetic, with its count
        (for logs and the serve banner); empty when none does."""
        return [f"{n} linears {note}" for note, n in self._notes.items()]

    def describe(self) -> Mapping[str, str]:
        return dict(self.backends)


def _implements(backend: str, op: str) -> bool:
    from agentspeed.kernels.registry import backends_for

    return any(k.backend == backend for k in backends_for(op))


def _device_of(t: torch.Tensor) -> str:
    return t.device.type


# Convenience entry points: select per call (for users and tests, not hot paths).
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return select_kernel("rms_norm", _device_of(x), x.dtype).fn(x, weight, eps)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return select_kernel("silu_and_mul", _device_of(x), x.dtype).fn(x, out)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return select_kernel("rotary_embedding", _device_of(q), q.dtype).fn(q, k, cos_sin)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    op = "paged_attention_decode" if meta.is_decode else "paged_attention_prefill"
    traits = {"head_dim": q.shape[-1], "page_size": meta.page_size, "sliding_window": window is not None}
    return select_kernel(op, _device_of(q), q.dtype, traits).fn(q, k_cache, v_cache, meta, scale, window=window)


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    return select_kernel("sample", _device_of(logits), logits.dtype).fn(logits, params)
