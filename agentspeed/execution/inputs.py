"""Flatten a step's sequences into model inputs: token ids, positions, slot mapping,
page tables, and which rows need logits. No padding between sequences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentspeed.kernels.api import AttentionMetadata


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """One sequence's work in a step: compute `token_ids` at positions start, start+1, ...
    `pages` must cover positions [0, start + len(token_ids)). If `sample`, the logits of the
    last 1 + num_draft tokens are returned (the last token's alone without drafts)."""

    request_id: str
    token_ids: Sequence[int]
    start: int
    pages: Sequence[int]
    sample: bool = True
    num_draft: int = 0


@dataclass(frozen=True, slots=True)
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor


def build_inputs(chunks: Sequence[SequenceChunk], page_size: int, device: str) -> ModelInputs:
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qstart = [0]
    seq_lens: list[int] = []
    logits_rows: list[int] = []
    max_pages = max(len(c.pages) for c in chunks)
    table: list[list[int]] = []
    for c in chunks:
        n = len(c.token_ids)
        end = c.start + n
        if len(c.pages) * page_size < end:
            raise ValueError(f"request {c.request_id}: {len(c.pages)} pages cannot hold {end} tokens")
        ids.extend(c.token_ids)
        pos = range(c.start, end)
        positions.extend(pos)
        slots.extend(c.pages[p // page_size] * page_size + p % page_size for p in pos)
        qstart.append(qstart[-1] + n)
        seq_lens.append(end)
        if c.sample:
            if c.num_draft:
                logits_rows.extend(range(qstart[-1] - 1 - c.num_draft, qstart[-1]))
            else:
                logits_rows.append(qstart[-1] - 1)
        table.append([*c.pages, *([0] * (max_pages - len(c.pages)))])

    def t(x: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device=device)

    attn = AttentionMetadata(
        slot_mapping=t(slots, torch.int64),
        query_start_loc=t(qstart, torch.int32),
        seq_lens=t(seq_lens, torch.int32),
        page_table=t(table, torch.int32),
        query_lens_cpu=tuple(len(c.token_ids) for c in chunks),
        seq_lens_cpu=tuple(seq_lens),
        page_size=page_size,
        pages_cpu=tuple(c.pages for c in chunks),
    ).with_decode_split()
    return ModelInputs(t(ids, torch.int64), t(positions, torch.int64), attn, t(logits_rows, torch.int64))
