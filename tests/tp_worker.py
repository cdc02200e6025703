"""One tensor-parallel rank for tests/test_tp.py, run as a plain subprocess:

    python tests/tp_worker.py --rank R --world-size N --port P --out FILE [--kernels MODEL=SPEC ...] MODEL [MODEL ...]

For every model it builds a ModelRunner on this rank, runs greedy generation for PROMPTS and
the final-position logits via runner.forward (the same `compute` the test runs in-process
for TP=1); each rank writes {model path: {"tokens", "logits", "layout"}} with torch.save
to FILE (rank 0) or FILE.rankR.
Several models share one process (and one process group) to keep process start-up off the
test's clock."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentspeed.config import CacheConfig, EngineConfig, KernelConfig, ParallelConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.engine.simple_generate import generate
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.sampling_params import SamplingParams

NEW_TOKENS = 16
PAGE_SIZE = 5  # page boundaries fall mid-prompt
NUM_PAGES = 32
PROMPTS = [
    [5, 17, 42, 99, 3, 250, 7],
    [11, 11, 11, *range(30, 52)],
    [300, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 381],
]


def make_runner(model: str, tp: int = 1, rank: int = 0, port: int = 29517, kernels: str | None = None) -> ModelRunner:
    return ModelRunner(
        EngineConfig(
            model=model,
            device="cpu",
            dtype="float32",
            parallel=ParallelConfig(tp=tp, rank=rank, master_port=port),
            cache=CacheConfig(page_size=PAGE_SIZE, num_pages=NUM_PAGES),
            **({"kernels": KernelConfig.parse(kernels)} if kernels else {}),  # type: ignore[arg-type]
        )
    )


def compute(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """Greedy tokens [len(PROMPTS), NEW_TOKENS] (batched generation) and fp32 logits
    [2 * len(PROMPTS), vocab]: the final position of each prompt, then of each prompt +
    completion[:-1] (one batched forward each, so prefill is exercised with several sequences)."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = generate(runner, PROMPTS, params)
    tokens = torch.tensor([o.token_ids for o in outs], dtype=torch.int64)
    logits = []
    for seqs in (PROMPTS, [p + o.token_ids[:-1] for p, o in zip(PROMPTS, outs)]):
        chunks, next_page = [], 1
        for i, s in enumerate(seqs):
            n = -(-len(s) // PAGE_SIZE)
            chunks.append(ScheduledChunk(f"r{i}", s, 0, list(range(next_page, next_page + n))))
            next_page += n
        logits.append(runner.forward(chunks))
    return {
        "tokens": tokens,
        "logits": torch.cat(logits).clone(),
        # evidence of how this rank was built: (world size, vocab rows held, o_proj input
        # columns held = local heads x head dim)
        "layout": torch.tensor(
            [
                runner.comm.world_size,
                runner.model.body.embed_tokens.weight.shape[0],
                runner.model.body.layer0.attn.body.o_proj.local_in,
            ]
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernels", action="append", default=[], help="MODEL=SPEC: that model's --kernel-backend")
    args = ap.parse_args()
    kernels = dict(k.split("=", 1) for k in args.kernels)
    torch.set_num_threads(1)
    results: dict[str, dict[str, torch.Tensor]] = {}
    runner = None
    for model in args.models:
        runner = make_runner(model, args.world_size, args.rank, args.port, kernels.get(model))
        results[model] = compute(runner)
    out = args.out if args.rank == 0 else f"{args.out}.rank{args.rank}"
    torch.save(results, f"{out}.tmp")
    os.replace(f"{out}.tmp", out)  # the file appears only when complete
    if runner is not None:
        runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
