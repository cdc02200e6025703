"""The one frozen configuration hierarchy. Built once (from the CLI or the Python API)
and passed down; nothing reads options from anywhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from agentspeed.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling. kind is "linear", "llama3" or "yarn". For yarn,
    attention_factor multiplies cos/sin (None: derived from factor, mscale, mscale_all_dim)
    and mscale_all_dim also scales the attention softmax (DeepSeek)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True, slots=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3). Keys and values of all heads are
    up-projected from one kv_lora_rank latent per token; a rope_dim key is shared by all
    heads. q_lora_rank None means a plain q projection."""

    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True  # rotary pairs are adjacent (x0,x1),(x2,x3)... as in DeepSeek

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Width of one latent cache row: latent | roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """Mixture of experts (DeepSeek, Qwen3-MoE). MoE layers (`is_moe_layer`) use routed experts
    (top_k of num_experts, each of intermediate size `intermediate_size`) plus `num_shared`
    shared experts' worth of always-on MLP; the others a dense MLP. scoring "sigmoid" (V3:
    group score = sum of the top 2, choice biased by e_score_correction_bias, weights
    normalised if norm_topk_prob) or "softmax" (V2, Qwen3: topk_method "greedy" or
    "group_limited_greedy", group score = max)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    num_shared: int
    first_dense: int
    scoring: str = "sigmoid"
    topk_method: str = "noaux_tc"
    num_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # GPT-OSS: scoring "topk_softmax" (softmax over the chosen logits), biases on the router and
    # every expert projection, and a clamped SwiGLU: (clamp(up) + 1) * g * sigmoid(alpha * g)
    # with g = min(gate, limit).
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    sparse_step: int = 1  # Qwen3-MoE decoder_sparse_step: every sparse_step-th layer is MoE
    dense_layers: tuple[int, ...] = ()  # Qwen3-MoE mlp_only_layers

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense and i not in self.dense_layers and (i + 1) % self.sparse_step == 0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder, whatever the file format."""

    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_proj_bias: bool = False  # bias on the output projection (Llama attention_bias)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors of the rotary inverse frequencies, rot_dim/2 of them: GGUF's
    # rope_freqs tensor (llama.cpp's converter bakes Llama 3.1's scaling into it).
    rope_freq_factors: tuple[float, ...] | None = None
    mla: MLAConfig | None = None  # DeepSeek-style latent attention (num_kv_heads/head_dim unused)
    moe: MoEConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh" (Gemma)
    # Sliding-window attention: a token sees the last `sliding_window` keys (itself included)
    # in the layers marked True in sliding_layers (all layers when that is empty).
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_local_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3)
    attn_scale: float | None = None  # softmax scale; None: head_dim^-0.5
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit in every softmax

    def window(self, layer: int) -> int | None:
        """The sliding window of this layer, None for full attention."""
        if self.sliding_window is None or (self.sliding_layers and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """Tensor parallelism. rank is this process's rank; all ranks share everything else."""

    tp: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29517

    def __post_init__(self) -> None:
        if self.tp < 1 or not 0 <= self.rank < self.tp:
            raise ConfigError(f"invalid tensor parallel rank {self.rank} of {self.tp}")


KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8")
HOST_ALLOCATORS = ("caching", "system")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache. The pool size comes from num_pages, else kv_cache_memory (bytes on
    this rank), else from free memory: on CPU `cpu_memory_fraction` of what is available,
    at most `cpu_kv_cap` bytes and what max_model_len x max_num_seqs could use; on GPU
    `gpu_memory_utilization` of the device minus what is already in use."""

    page_size: int = 16
    num_pages: int | None = None
    # auto (the compute dtype) | bfloat16 | float16 | fp8 (e4m3 with per-token scales)
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_memory_fraction: float = 0.25
    cpu_kv_cap: int = 4 << 30
    # Hybrid models (sliding-window layers beside full ones): the window layers get their own
    # pool and keep only the pages a query can still see (an engine's scheduler gives the rest
    # back). window_num_pages sizes that pool (default: execution/kv_cache.py's split).
    hybrid_kv: bool = True
    window_num_pages: int | None = None
    # A host tier below the pool (execution/kv_tier.py): bytes per rank (None: no tier), and
    # its form: auto (int8 on CPU for float caches, exact on GPUs) | exact | int8.
    kv_offload_memory: int | None = None
    kv_offload_dtype: str = "auto"
    # Copy the pages the pool will evict next to the tier ahead of their eviction (beside the
    # forward on GPUs, between steps on CPUs), rather than when an allocation evicts them.
    kv_offload_writeback: bool = True
    # A disk tier below the host tier (execution/kv_disk.py): a directory and its bytes per rank.
    kv_offload_dir: str | None = None
    kv_offload_disk: int | None = None

    def __post_init__(self) -> None:
        if self.kv_offload_dtype not in ("auto", "exact", "int8"):
            raise ConfigError(f"kv offload dtype must be auto, exact or int8, got {self.kv_offload_dtype!r}")
        if self.kv_offload_memory is not None and self.kv_offload_memory <= 0:
            raise ConfigError(f"kv offload memory must be positive, got {self.kv_offload_memory}")
        if (self.kv_offload_dir is None) != (self.kv_offload_disk is None):
            raise ConfigError("a disk KV tier needs both --kv-offload-dir and --kv-offload-disk")
        if self.kv_offload_dir is not None and self.kv_offload_memory is None:
            raise ConfigError("a disk KV tier (--kv-offload-dir) sits below the host tier: "
                              "give --kv-offload-memory too")
        if self.kv_offload_disk is not None and self.kv_offload_disk <= 0:
            raise ConfigError(f"kv offload disk must be positive, got {self.kv_offload_disk}")
        if self.page_size < 1:
            raise ConfigError(f"page size must be >= 1, got {self.page_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Kernel backend overrides: (op, backend) pairs; op "*" forces a backend for every op
    it implements. Selection fails loudly when a forced backend cannot run."""

    overrides: tuple[tuple[str, str], ...] = ()

    ENV = "AGENTSPEED_KERNEL_BACKEND"

    @staticmethod
    def from_spec(spec: str | None) -> KernelConfig:
        """The overrides a user asked for: `spec` (--kernel-backend, LLM(kernel_backend=)),
        else $AGENTSPEED_KERNEL_BACKEND. The one place the environment is read."""
        return KernelConfig.parse(spec if spec else os.environ.get(KernelConfig.ENV))

    @staticmethod
    def parse(spec: str | None) -> KernelConfig:
        """Parse "backend" or "op=backend,op=backend"."""
        if not spec:
            return KernelConfig()
        pairs: list[tuple[str, str]] = []
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            op, sep, backend = item.partition("=")
            pairs.append((op.strip(), backend.strip()) if sep else ("*", op))
        return KernelConfig(tuple(pairs))


CPU_DEFAULT_DRAFTS = 3
MAX_DRAFTS = 7  # 1 + 7 query tokens is the most a decode kernel takes (kernels.api.MAX_DECODE_QUERY)


@dataclass(frozen=True, slots=True)
class SchedulingConfig:
    """How the scheduler batches. None fields have device-dependent defaults, filled by
    `resolve_defaults` once the engine knows its device."""

    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 256  # most requests in one step
    enable_prefix_caching: bool = True
    # None: on for GPUs (the forward is an async launch, planning hides behind it), off on
    # CPU (planning competes with the forward's threads for the same cores: measured 10%
    # slower, see docs/benchmarks.md), and off with speculative decoding (they do not combine).
    overlap: bool | None = None
    # Speculative decoding by n-gram prompt lookup: most drafts per decode step (0: off), for
    # greedy requests without penalties or logprobs (verification compares argmaxes). None:
    # CPU_DEFAULT_DRAFTS on CPU unless overlap is asked for (measured faster on agent traffic
    # there, docs/benchmarks.md), off on GPUs (not measured there; overlap is on instead).
    num_speculative_tokens: int | None = None
    ngram_max: int = 3  # drafts follow the latest earlier match of the last ngram_max..ngram_min tokens
    ngram_min: int = 1
    adaptive_drafts: bool = True  # per-request draft length from its acceptance (control/draft_policy.py)
    # Report every page the prefix cache publishes or evicts (control/kv_events.py), for a
    # cache-aware gateway; on when the gRPC worker serves (it streams them to subscribers).
    kv_events: bool = False
    # Cached pages of a session (the X-SMG-Routing-Key / X-Session-Id key) are kept through
    # its expected pause between turns, ahead of other cached pages (control/retention.py);
    # off: plain LRU. The cap bounds how long an idle session is favoured (seconds).
    session_retention: bool = True
    session_gap_cap_s: float = 300.0
    # A finished turn's last, partly filled page is reused by a request continuing its tokens.
    partial_page_reuse: bool = True

    def __post_init__(self) -> None:
        if self.session_gap_cap_s <= 0:
            raise ConfigError(f"session_gap_cap_s must be positive, got {self.session_gap_cap_s}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ConfigError("max_num_batched_tokens and max_num_seqs must be at least 1")
        k = self.num_speculative_tokens
        if k is not None and not 0 <= k <= MAX_DRAFTS:
            raise ConfigError(f"num_speculative_tokens must be in [0, {MAX_DRAFTS}], got {k}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.overlap and k:
            # A step planned while a draft step runs cannot include that request (how many of
            # its drafts stand is not known yet), so each request would decode every other step.
            raise ConfigError("overlap and speculative decoding do not combine: with overlap a request "
                              "with drafts in flight skips the next step; drop --overlap or "
                              "--num-speculative-tokens")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything needed to build an engine. model is a local path (HF directory or GGUF
    file); None means the embedded default model."""

    model: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None
    seed: int = 0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    # Grammar library for constrained decoding: auto (xgrammar, else llguidance) | xgrammar | guidance
    structured_output_backend: str = "auto"
    # CPU tensors of >= 1 MiB: "caching" (execution/host_alloc.py: blocks mapped once and reused,
    # as a GPU caching allocator does) | "system" (glibc's malloc, torch's default)
    host_allocator: str = "caching"

    def __post_init__(self) -> None:
        if self.host_allocator not in HOST_ALLOCATORS:
            raise ConfigError(f"host allocator must be one of {', '.join(HOST_ALLOCATORS)}, got {self.host_allocator!r}")


def resolve_defaults(cfg: EngineConfig, device: str) -> EngineConfig:
    """The one place device-dependent defaults are decided (device: "cpu" or "cuda", as the
    model was placed): speculation and overlap, see SchedulingConfig."""
    s = cfg.scheduling
    cpu = device == "cpu"
    k = s.num_speculative_tokens
    if k is None:
        k = CPU_DEFAULT_DRAFTS if cpu and not s.overlap else 0
    overlap = s.overlap if s.overlap is not None else not cpu and not k
    return replace(cfg, device=device, scheduling=replace(s, num_speculative_tokens=k, overlap=overlap))
