"""Triton `mla_decode`: absorbed-form multi-head latent attention over a paged latent cache.

Contract (as `agentspeed.kernels.reference.mla_decode`): q [T, H, lora_rank + rope_dim],
kv_cache [num_pages, page_size, lora_rank + rope_dim] with rows [latent | roped key]; score =
scale * q . row, value = row[:lora_rank]; query row i of sequence b sits at position
seq_lens[b] - query_len[b] + i and sees keys at positions <= its own. Output
[T, H, lora_rank] in q.dtype, accumulated in fp32. An fp8 cache carries per-token float32
scales [num_pages, page_size] (kv_scale): the real row is cache_row.float() * scale.

Design
  * Rows = (query token, head) pairs. A decode step with q_len 1-4 and few heads (H = 16
    under TP=8) would leave most of a 16+ row matrix-multiply tile empty if a program took
    one token's heads; folding the query axis into the head axis gives q_len * H rows per
    sequence, and a program takes BLOCK_H of them, each with its own causal limit. Every K
    tile it loads serves all its rows through `tl.dot`.
  * Grid (head blocks, splits, sequences): head blocks vary fastest so the programs that
    read the same K tiles run side by side and share them in L2.
  * Split-KV: each split of a sequence takes a contiguous run of whole pages (the
    sequence's pages divided evenly over the splits), writes its normalised partial output
    and base-2 log-sum-exp in fp32 to scratch, and a second kernel merges the splits. With
    one split the first kernel writes the output itself.
  * The latent (lora_rank) and the roped key (rope_dim) are loaded as two blocks, each padded
    to a power of two and masked, so 512 + 64 = 576 is not padded to 1024. The value is the
    latent block already loaded for the scores.
  * Paging: when a page holds a whole number of tiles a tile lies in one page (splits start
    on page boundaries) and one page-table entry addresses it; otherwise each token looks up
    page_table[b, pos // page_size] and its offset pos % page_size.
  * fp8: tiles are converted to the dot dtype (exact: every e4m3 value is a bf16/fp16
    value) and the per-token scale is applied to the fp32 scores, and to the probabilities
    (relative to the tile's largest scale, so fp16 does not underflow) before P @ V.

The op is registered by `agentspeed.kernels.triton` (without importing triton); this module
imports triton and is loaded on the first call. Under the Triton interpreter
(TRITON_INTERPRET=1, which must be set before triton is imported) bfloat16 operands are
multiplied as raw integers, so there every operand is widened to fp32 before `tl.dot`; on a
GPU the dots take q's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from agentspeed.kernels.api import AttentionMetadata
from agentspeed.kernels.triton import DTYPES, MAX_LORA_RANK, MAX_ROPE_DIM

# Split-KV heuristic: aim for this many waves of programs over the GPU's SMs, never give a
# split fewer tokens than MIN_TOKENS_PER_SPLIT (a split's fixed cost is its query load and
# its partial-output write), and cap the scratch and merge work at MAX_SPLITS.
TARGET_WAVES = 2
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 128
DEFAULT_NUM_SMS = 132  # H100 SXM; used when no CUDA device is at hand (the interpreter)

_LOG2E = 1.4426950408889634
_TL_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}

# Whether kernels run in the CPU interpreter. Triton fixes this for its own `@jit` helpers
# when it is imported, and `@triton.jit` below for these kernels when this module is: the
# two must agree, or interpreted kernels would call GPU-only helpers (or the reverse).
INTERPRETED = isinstance(tl.zeros, InterpretedFunction)
if bool(triton.knobs.runtime.interpret) != INTERPRETED:
    raise ImportError("TRITON_INTERPRET changed between importing triton and "
                      "agentspeed.kernels.triton.mla_decode; set it before either is imported")


@triton.jit
def _mla_split_kernel(
    q_ptr, kv_ptr, kv_scale_ptr, page_table_ptr, query_start_ptr, seq_lens_ptr,
    out_ptr, part_ptr, lse_ptr,
    qk_scale, num_splits,
    stride_qt, stride_qh,
    stride_kvp, stride_kvt,
    stride_sp, stride_st,
    stride_pt,
    stride_ot, stride_oh,
    stride_part_s, stride_part_r, stride_lse_s,
    H: tl.constexpr, LORA: tl.constexpr, ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_LORA: tl.constexpr, BLOCK_ROPE: tl.constexpr,
    HAS_SCALE: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    DOT_TY: tl.constexpr,
):
    """One (head block, split, sequence): partial attention of BLOCK_H (token, head) rows
    over the split's pages. Writes the final output (WRITE_PARTIAL false, one split) or the
    normalised partial output and base-2 LSE of every row it owns (even an empty split, so
    the merge reads no uninitialised scratch). Dots are "ieee": fp32 operands (the fp32
    model) get no TF32 rounding, matching the reference; 16-bit operands are unaffected."""
    head_block = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    n_rows = q_len * H
    if head_block * BLOCK_H >= n_rows:
        return

    rows = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    q_idx = rows // H
    head = rows % H
    token = (q_start + q_idx).to(tl.int64)
    limit = seq_len - q_len + q_idx  # the last key position each row may attend to

    d_lora = tl.arange(0, BLOCK_LORA)
    lora_ok = d_lora < LORA
    q_row = q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh
    q_lora = tl.load(q_row + d_lora[None, :], mask=row_ok[:, None] & lora_ok[None, :], other=0.0)
    q_lora = q_lora.to(DOT_TY)
    if ROPE > 0:
        d_rope = tl.arange(0, BLOCK_ROPE)
        rope_ok = d_rope < ROPE
        q_rope = tl.load(q_row + LORA + d_rope[None, :], mask=row_ok[:, None] & rope_ok[None, :],
                         other=0.0)
        q_rope = q_rope.to(DOT_TY)

    # This split's pages: the sequence's pages shared out evenly, so every split of a long
    # sequence does about the same work whatever the other sequences' lengths.
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    pages_per_split = (n_pages + num_splits - 1) // num_splits
    start = split * pages_per_split * PAGE_SIZE
    end = tl.minimum(start + pages_per_split * PAGE_SIZE, seq_len)

    # A finite floor keeps exp2(m_old - m_new) at 1, not NaN, while a row has seen no key.
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_LORA], tl.float32)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt
    for n_start in range(start, end, BLOCK_N):
        pos = n_start + tl.arange(0, BLOCK_N)
        key_ok = pos < end
        if PAGE_SIZE % BLOCK_N == 0:
            # The tile lies in one page: one page-table entry, contiguous rows.
            page = tl.load(page_row + n_start // PAGE_SIZE).to(tl.int64)
            offset = n_start % PAGE_SIZE + tl.arange(0, BLOCK_N)
        else:
            page = tl.load(page_row + pos // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
            offset = pos % PAGE_SIZE
        # int64: pages * page stride passes 2**31 elements on a large cache.
        kv_row = kv_ptr + page * stride_kvp + offset * stride_kvt
        k_lora = tl.load(kv_row[:, None] + d_lora[None, :],
                         mask=key_ok[:, None] & lora_ok[None, :], other=0.0).to(DOT_TY)
        scores = tl.dot(q_lora, tl.trans(k_lora), input_precision="ieee")
        if ROPE > 0:
            k_rope = tl.load(kv_row[:, None] + LORA + d_rope[None, :],
                             mask=key_ok[:, None] & rope_ok[None, :], other=0.0).to(DOT_TY)
            scores = tl.dot(q_rope, tl.trans(k_rope), scores, input_precision="ieee")
        if HAS_SCALE:
            token_scale = tl.load(kv_scale_ptr + page * stride_sp + offset * stride_st,
                                  mask=key_ok, other=0.0)
            scores = scores * token_scale[None, :]
        scores = scores * qk_scale
        visible = key_ok[None, :] & (pos[None, :] <= limit[:, None])
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_SCALE:
            # Scale P by each token's scale relative to the tile's largest, so the dot
            # operand stays in [0, 1] (tiny absolute scales would underflow fp16).
            top = tl.maximum(tl.max(token_scale, 0), 1.0e-30)
            pv = (p * (token_scale / top)[None, :]).to(DOT_TY)
            acc += tl.dot(pv, k_lora, input_precision="ieee") * top
        else:
            acc = tl.dot(p.to(DOT_TY), k_lora, acc, input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0  # false only where a split holds none of a row's visible keys
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    store_mask = row_ok[:, None] & lora_ok[None, :]
    if WRITE_PARTIAL:
        flat = token * H + head
        tl.store(part_ptr + split * stride_part_s + flat[:, None] * stride_part_r + d_lora[None, :],
                 out, mask=store_mask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + split * stride_lse_s + flat, lse, mask=row_ok)
    else:
        o_ptr = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d_lora[None, :]
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _mla_merge_kernel(
    part_ptr, lse_ptr, out_ptr,
    num_splits, n_rows,
    stride_part_s, stride_part_r, stride_lse_s,
    stride_ot, stride_oh,
    H: tl.constexpr, LORA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_LORA: tl.constexpr,
):
    """BLOCK_R flat rows (token * H + head): out = sum_s w_s o_s / sum_s w_s with
    w_s = 2**(lse_s - max lse), folded in one split at a time."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    flat = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_LORA)
    mask = row_ok[:, None] & (d[None, :] < LORA)
    m = tl.full([BLOCK_R], -1.0e30, tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_LORA], tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(lse_ptr + s * stride_lse_s + flat, mask=row_ok, other=float("-inf"))
        part = tl.load(part_ptr + s * stride_part_s + flat[:, None] * stride_part_r + d[None, :],
                       mask=mask, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + part * w[:, None]
        den = den * alpha + w
        m = m_new
    out = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    token = flat // H
    head = flat % H
    o_ptr = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device`; DEFAULT_NUM_SMS off CUDA (the interpreter)."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def default_num_splits(
    num_seqs: int, head_blocks: int, max_seq_len: int, page_size: int, sms: int = DEFAULT_NUM_SMS
) -> int:
    """Splits per sequence: enough (head block, split, sequence) programs for TARGET_WAVES
    waves over `sms` SMs, but at least MIN_TOKENS_PER_SPLIT tokens per split (so short
    contexts get one split), no more splits than the longest sequence has pages, and at most
    MAX_SPLITS. A large batch fills the GPU by itself and gets one split."""
    programs = max(1, num_seqs * head_blocks)
    wanted = -(-TARGET_WAVES * sms // programs)
    by_length = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    pages = max(1, -(-max_seq_len // page_size))
    return max(1, min(wanted, by_length, pages, MAX_SPLITS))


def default_block_h(rows: int, lora_rank: int) -> int:
    """Rows per program: the rows a sequence has, rounded up to a power of two, at least 16
    (the smallest `tl.dot` tile), at most 32 at DeepSeek widths (the fp32 accumulator is
    BLOCK_H x 512) and 64 for narrower latents."""
    cap = 32 if lora_rank > 256 else 64
    return min(cap, max(16, triton.next_power_of_2(rows)))


def default_block_n(lora_rank: int, rope_dim: int) -> int:
    """Keys per tile: 32 at DeepSeek widths (a 32 x 576 bf16 tile is 36 KiB of shared memory
    per pipeline stage), 64 for narrower rows."""
    return 32 if lora_rank + rope_dim > 256 else 64


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Block sizes, grid and launch settings of one `mla_decode_triton` call."""

    block_h: int  # (query token, head) rows per program
    block_n: int  # keys per tile
    block_lora: int
    block_rope: int
    head_blocks: int  # grid axis 0: row blocks of the sequence with the most rows
    num_splits: int  # grid axis 1: KV splits per sequence
    num_warps: int
    num_stages: int


def plan_launch(
    heads: int, lora_rank: int, rope_dim: int, meta: AttentionMetadata, device: torch.device, *,
    num_splits: int | None = None, block_h: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> LaunchPlan:
    """The launch for these shapes, from meta's host copies only (no device sync). Each knob
    left None takes its default; block_h and block_n must be powers of two >= 16 (the
    smallest `tl.dot` tile)."""
    max_rows = max(meta.query_lens_cpu) * heads
    block_h = block_h or default_block_h(max_rows, lora_rank)
    block_n = block_n or default_block_n(lora_rank, rope_dim)
    for name, v in (("block_h", block_h), ("block_n", block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    head_blocks = triton.cdiv(max_rows, block_h)
    if num_splits is None:
        num_splits = default_num_splits(len(meta.seq_lens_cpu), head_blocks,
                                        max(meta.seq_lens_cpu), meta.page_size, num_sms(device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_lora = max(16, triton.next_power_of_2(lora_rank))
    block_rope = max(16, triton.next_power_of_2(max(rope_dim, 1)))
    if num_warps is None:
        # More warps once the fp32 accumulator passes 32 x 512, to keep it in registers.
        num_warps = 8 if block_h * block_lora >= 32 * 512 else 4
    return LaunchPlan(block_h, block_n, block_lora, block_rope, head_blocks, num_splits,
                      num_warps, num_stages or 2)


def _check_inputs(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, lora_rank: int,
    kv_scale: torch.Tensor | None,
) -> None:
    if q.dim() != 3 or kv_cache.dim() != 3:
        raise ValueError(f"mla_decode wants q [T, H, Dk] and kv_cache [pages, page_size, Dk], "
                         f"got {tuple(q.shape)} and {tuple(kv_cache.shape)}")
    dk = q.shape[2]
    if kv_cache.shape[2] != dk or not 0 < lora_rank <= dk:
        raise ValueError(f"mla_decode: q width {dk}, cache width {kv_cache.shape[2]}, "
                         f"lora_rank {lora_rank} do not fit together")
    if lora_rank > MAX_LORA_RANK or dk - lora_rank > MAX_ROPE_DIM:
        raise ValueError(f"mla_decode (triton): lora_rank {lora_rank} / rope_dim {dk - lora_rank} "
                         f"beyond {MAX_LORA_RANK} / {MAX_ROPE_DIM}")
    if q.dtype not in DTYPES:
        raise TypeError(f"mla_decode (triton): q dtype {q.dtype} not in {list(DTYPES)}")
    if kv_cache.shape[1] != meta.page_size:
        raise ValueError(f"cache page size {kv_cache.shape[1]} != meta.page_size {meta.page_size}")
    if kv_scale is not None and tuple(kv_scale.shape) != tuple(kv_cache.shape[:2]):
        raise ValueError(f"kv_scale {tuple(kv_scale.shape)} must be [num_pages, page_size] "
                         f"= {tuple(kv_cache.shape[:2])}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("the triton mla_decode runs on CUDA tensors, or on CPU tensors only "
                           "under the triton interpreter (TRITON_INTERPRET=1 before triton "
                           "is imported)")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def mla_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    lora_rank: int,
    kv_scale: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_h: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The `mla_decode` op (see the module docstring): out [T, H, lora_rank] in q.dtype.
    Runs on CUDA tensors, or on CPU tensors under the interpreter.

    The keyword-only knobs are for tests and tuning; None picks the defaults above. Plans from
    meta's host copies (query_lens_cpu, seq_lens_cpu): no device-to-host sync. Needs every
    sequence's seq_len >= its query length, as the op does.
    """
    _check_inputs(q, kv_cache, meta, lora_rank, kv_scale)
    T, H, dk = q.shape
    rope_dim = dk - lora_rank
    out = torch.empty(T, H, lora_rank, dtype=q.dtype, device=q.device)
    num_seqs = len(meta.query_lens_cpu)
    if T == 0 or num_seqs == 0:
        return out

    plan = plan_launch(H, lora_rank, rope_dim, meta, q.device, num_splits=num_splits,
                       block_h=block_h, block_n=block_n, num_warps=num_warps,
                       num_stages=num_stages)
    num_splits = plan.num_splits
    q = _last_dim_contiguous(q)
    kv_cache = _last_dim_contiguous(kv_cache)
    page_table = _last_dim_contiguous(meta.page_table)

    partial = num_splits > 1
    if partial:
        part = torch.empty(num_splits, T * H, lora_rank, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_splits, T * H, dtype=torch.float32, device=q.device)
        part_strides, lse_stride = (part.stride(0), part.stride(1)), lse.stride(0)
    else:  # unused by the kernel: it writes `out` directly
        part = lse = out
        part_strides, lse_stride = (0, 0), 0
    scale_arg = kv_scale if kv_scale is not None else q  # a placeholder pointer when unscaled
    scale_strides = (kv_scale.stride(0), kv_scale.stride(1)) if kv_scale is not None else (0, 0)
    dot_ty = tl.float32 if INTERPRETED else _TL_DTYPES[q.dtype]

    _mla_split_kernel[(plan.head_blocks, num_splits, num_seqs)](
        q, kv_cache, scale_arg, page_table, meta.query_start_loc, meta.seq_lens,
        out, part, lse,
        float(scale) * _LOG2E, num_splits,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        *scale_strides,
        page_table.stride(0),
        out.stride(0), out.stride(1),
        *part_strides, lse_stride,
        H=H, LORA=lora_rank, ROPE=rope_dim, PAGE_SIZE=meta.page_size,
        BLOCK_H=plan.block_h, BLOCK_N=plan.block_n, BLOCK_LORA=plan.block_lora,
        BLOCK_ROPE=plan.block_rope,
        HAS_SCALE=kv_scale is not None, WRITE_PARTIAL=partial,
        DOT_TY=dot_ty,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if partial:
        block_r = 16
        _mla_merge_kernel[(triton.cdiv(T * H, block_r),)](
            part, lse, out,
            num_splits, T * H,
            part.stride(0), part.stride(1), lse.stride(0),
            out.stride(0), out.stride(1),
            H=H, LORA=lora_rank, BLOCK_R=block_r, BLOCK_LORA=plan.block_lora,
            num_warps=4 if plan.block_lora <= 512 else 8,
        )
    return out
