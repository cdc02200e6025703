"""Offline estimate for n-gram (prompt-lookup) speculative decoding with the engine's own
drafter (agentspeed/control/ngram.py, `serve --num-speculative-tokens K`): how many tokens one
verification step yields if each step drafts the k tokens that followed the latest earlier
occurrence of the last 3 (else 2, else 1) tokens, and greedy verification accepts the drafts
that match.

Two sources of answers:
  real agent answers (default): the recorded assistant messages of the agent_traj sessions,
      tokenized with SmolLM2's tokenizer, each drafted from the conversation so far plus the
      answer so far (as if the served model produced exactly what the recorded agent did);
  --synthetic: SmolLM2's own greedy output on random-token prompts, like the trie replay's
      (the small model falls into repetition loops there, so this overstates real gains).

    python benchmarks/studies/ngram_acceptance.py [--traj-dir ../shared/workloads/agent_traj] [--max-turns 400]
    python benchmarks/studies/ngram_acceptance.py --synthetic
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

from agentspeed.control.ngram import NgramDrafter

DRAFTS = (1, 3, 5)
MAX_N = 3


def steps_for(context: list[int], answer: list[int], k: int) -> int:
    """Verification steps to produce `answer` after `context` with k-token drafts."""
    tokens = list(context)
    h = NgramDrafter(tokens, MAX_N, 1)
    i = steps = 0
    while i < len(answer):
        d = h.draft(k)
        acc = 0
        while acc < len(d) and i + acc < len(answer) and answer[i + acc] == d[acc]:
            acc += 1
        n = min(acc + 1, len(answer) - i)
        tokens.extend(answer[i : i + n])
        i += n
        steps += 1
    return steps


def traj_turns(traj_dir: Path, max_turns: int) -> Iterator[tuple[list[int], list[int]]]:
    from agentspeed.model_source import resolve_model
    from agentspeed.tokenizer import Tokenizer

    tok = Tokenizer.load(resolve_model(None))
    n = 0
    for f in sorted(traj_dir.rglob("*.traj.json")):
        context: list[int] = []
        for m in json.loads(f.read_text()).get("messages") or []:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                continue
            ids = tok.encode(content)
            if m.get("role") == "assistant" and context:
                yield context, ids
                n += 1
                if n >= max_turns:
                    return
            context = context + ids


def synthetic_turns(n_prompts: int) -> Iterator[tuple[list[int], list[int]]]:
    from agentspeed.engine.llm import LLM
    from agentspeed.sampling_params import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(800)] for _ in range(n_prompts)]
    outs = LLM().generate(prompts, SamplingParams(temperature=0, max_tokens=96, ignore_eos=True))
    for p, o in zip(prompts, outs):
        yield p, list(o.outputs[0].token_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traj-dir", default=str(Path(__file__).resolve().parents[3] / "shared/workloads/agent_traj"))
    ap.add_argument("--max-turns", type=int, default=400)
    ap.add_argument("--synthetic", action="store_true")
    a = ap.parse_args()
    turns = list(synthetic_turns(6) if a.synthetic else traj_turns(Path(a.traj_dir), a.max_turns))
    tokens = sum(len(ans) for _, ans in turns)
    src = "SmolLM2 greedy on random-token prompts" if a.synthetic else f"recorded answers in {a.traj_dir}"
    print(f"command: python benchmarks/studies/ngram_acceptance.py{' --synthetic' if a.synthetic else ''}")
    print(f"{len(turns)} answers, {tokens} tokens ({src})")
    for k in DRAFTS:
        steps = sum(steps_for(c, ans, k) for c, ans in turns)
        print(f"draft {k}: {tokens / steps:.2f} tokens per verification step")


if __name__ == "__main__":
    main()
