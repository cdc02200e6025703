"""Flatten a step's chunks into model inputs: token ids, positions, slot mapping, page
tables, and which rows need logits. No padding between sequences. Page tables come from the
persistent RequestTable (rows gathered, not rebuilt); per-token work is tensor ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentspeed.control.plan import ScheduledChunk
from agentspeed.execution.request_state import RequestState, RequestTable
from agentspeed.kernels.api import AttentionMetadata


@dataclass(frozen=True, slots=True)
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor
    attn_window: AttentionMetadata | None = None  # the sliding-window layers' (hybrid caches)


def build_inputs(
    chunks: Sequence[ScheduledChunk], states: list[RequestState], table: RequestTable, page_size: int
) -> ModelInputs:
    """states[i] is chunks[i]'s request, its page delta already applied (RequestTable.apply).
    Token ids must be concrete (LAST_SAMPLED substituted)."""
    ids: list[int] = []
    positions: list[int] = []
    qstart = [0]
    seq_lens: list[int] = []
    logits_rows: list[int] = []
    max_pages = max_wpages = 0
    for c, st in zip(chunks, states):
        n = len(c.token_ids)
        end = c.start + n
        if len(st.pages) * page_size < end:
            raise ValueError(f"request {c.request_id}: {len(st.pages)} pages cannot hold {end} tokens")
        ids.extend(c.token_ids)
        positions.extend(range(c.start, end))
        qstart.append(qstart[-1] + n)
        seq_lens.append(end)
        if len(st.pages) > max_pages:
            max_pages = len(st.pages)
        if len(st.wpages) > max_wpages:
            max_wpages = len(st.wpages)
        if c.sample:
            if c.num_draft:
                logits_rows.extend(range(qstart[-1] - 1 - c.num_draft, qstart[-1]))
            else:
                logits_rows.append(qstart[-1] - 1)

    dev = table.device
    page_table = table.rows(states, max_pages)
    pos = torch.tensor(positions, dtype=torch.int64, device=dev)
    qlens = tuple(len(c.token_ids) for c in chunks)
    if len(ids) == len(chunks):  # one token per sequence: row b holds token b
        seq_of_token = torch.arange(len(chunks), device=dev)
    else:
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(chunks), device=dev), torch.tensor(qlens, device=dev)
        )
    query_start_loc = torch.tensor(qstart, dtype=torch.int32, device=dev)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    in_page = pos % page_size
    page_of = pos // page_size

    def metadata(table: torch.Tensor, pages: tuple[list[int], ...]) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=table[seq_of_token, page_of].to(torch.int64) * page_size + in_page,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens_t,
            page_table=table,
            query_lens_cpu=qlens,
            seq_lens_cpu=tuple(seq_lens),
            page_size=page_size,
            pages_cpu=pages,
        ).with_decode_split()

    attn = metadata(page_table, tuple(st.pages for st in states))
    attn_window = None
    if table.wtable is not None:
        for c, st in zip(chunks, states):
            if len(st.wpages) * page_size < c.start + len(c.token_ids):
                raise ValueError(f"request {c.request_id}: {len(st.wpages)} window pages cannot hold its chunk")
        attn_window = metadata(table.rows(states, max_wpages, window=True), tuple(st.wpages for st in states))
    return ModelInputs(
        torch.tensor(ids, dtype=torch.int64, device=dev), pos, attn,
        torch.tensor(logits_rows, dtype=torch.int64, device=dev), attn_window,
    )
