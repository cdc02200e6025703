"""Cost of constrained decoding on the default model (SmolLM2-135M GGUF, CPU).

1. Per-step masking cost at batch 1, 8 and 32 with a realistic tool schema (a coding agent's
   edit_file call): the grammar fill of every row, then applying the masks to the logits.
2. Decode tok/s at batch 1 and 8, greedy, free vs constrained by a forced edit_file call (the
   same number of tokens in both arms; prefill and admission subtracted, see decode_rate).

    .venv/bin/python benchmarks/engine/bench_structured.py [--backend xgrammar|guidance] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from agentspeed.engine.llm import LLM
from agentspeed.entrypoints.structured import forced_tool_calls
from agentspeed.sampling_params import SamplingParams, StructuredOutputs
from agentspeed.structured.bitmask import allocate, apply_bitmask

EDIT = {"name": "edit_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "old_string": {"type": "string"}, "new_string": {"type": "string"},
    "replace_all": {"type": "boolean"}, "mode": {"enum": ["patch", "overwrite", "append"]},
    "lines": {"type": "array", "items": {"type": "integer"}}}, "required": ["path", "old_string", "new_string"]}}
PREFIX = '[{"name": "edit_file", "arguments": {"path": "src/app/main.py", "old_string": "def f(x):'


def mask_cost(llm: LLM, batch: int, reps: int = 50) -> tuple[float, float]:
    mgr = llm.engine.structured
    so = forced_tool_calls([EDIT], None)
    compiled = mgr.compile(so)
    assert llm.tokenizer is not None
    prefix = llm.tokenizer.encode(PREFIX if mgr.backend_name == "xgrammar" else PREFIX.replace(": ", ":").replace(", ", ","),
                                  add_special_tokens=False)
    matchers = []
    for b in range(batch):  # rows at different points: inside a string, between keys...
        m = mgr.matcher(compiled)
        for t in prefix[: len(prefix) - (b % 5)]:
            assert m.accept(t)
        matchers.append(m)
    vocab = llm.runner.model_config.vocab_size
    mask = allocate(batch, vocab)
    logits = torch.randn(batch, vocab)
    rows = list(range(batch))
    apply_bitmask(logits, mask, rows)  # warm: builds the bias table
    t0 = time.perf_counter()
    for _ in range(reps):
        for r, m in enumerate(matchers):
            m.fill(mask, r)
    fill = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        apply_bitmask(logits, mask, rows)
    return fill * 1e6, (time.perf_counter() - t0) / reps * 1e6


def decode_rate(llm: LLM, constrained: bool, batch: int, tokens: int) -> tuple[float, int]:
    """Decode tok/s of `batch` greedy requests: the time of a `tokens`-token run less that of a
    1-token run (admission, prefill and the first token), over the tokens in between. The
    constrained arm's new_string has a minLength no run reaches, so both arms decode exactly
    `tokens` tokens per request."""
    ask = [{"role": "user", "content": "Fix the bug in src/app/main.py: f returns None for x=0."}]
    so = StructuredOutputs(json=json.dumps({"type": "array", "items": {"type": "object", "properties": {
        "name": {"const": "edit_file"}, "arguments": {"type": "object", "properties": {
            "path": {"type": "string"}, "old_string": {"type": "string"},
            "new_string": {"type": "string", "minLength": 4000}},
            "required": ["path", "old_string", "new_string"]}}, "required": ["name", "arguments"]}}))

    def run(n: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                structured_outputs=so if constrained else None)
        t0 = time.perf_counter()
        outs = llm.chat([ask] * batch, params)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    run(tokens)  # warm: prefix cache, grammar cache
    t_full, n_full = run(tokens)
    t_one, n_one = run(1)
    return (n_full - n_one) / (t_full - t_one), n_full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="xgrammar", choices=["xgrammar", "guidance"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="alternating free/constrained pairs per batch size")
    args = ap.parse_args()
    # Drafting off for both arms: constrained requests never draft, so compare like with like.
    llm = LLM(structured_output_backend=args.backend, num_speculative_tokens=0)
    print(f"backend {args.backend}, vocab {llm.runner.model_config.vocab_size}, torch threads {torch.get_num_threads()}")
    print("batch  fill us/step  apply us/step  per row us")
    for b in (1, 8, 32):
        fill, apply = mask_cost(llm, b)
        print(f"{b:5d}  {fill:12.0f}  {apply:13.0f}  {(fill + apply) / b:10.1f}")
    for b in (1, 8):
        frees, cons = [], []
        for r in range(args.repeats):  # the arms take turns: drift hits both alike
            free, nf = decode_rate(llm, False, b, args.tokens)
            con, nc = decode_rate(llm, True, b, args.tokens)
            frees.append(free)
            cons.append(con)
            print(f"batch {b} pair {r + 1}: free {free:.1f} tok/s ({nf} tokens), constrained {con:.1f} tok/s "
                  f"({nc} tokens): {(1 - con / free) * 100:+.1f}% slower")
        mf, mc = statistics.median(frees), statistics.median(cons)
        print(f"batch {b} median of {args.repeats}: free {mf:.1f}, constrained {mc:.1f}: {(1 - mc / mf) * 100:+.1f}% slower")
    llm.shutdown()


if __name__ == "__main__":
    main()
