"""Greedy outputs on real agent conversations, saved or compared against a saved run: the
check that a refactor of the request path changed no token. Each session's last recorded
turn, rendered with the chat template, its last --prompt-tokens tokens, all prompts in one
batch. Every third prompt adds a frequency and presence penalty and every fourth asks for
logprobs, so the penalty counts and the logprob path are covered too (drafting is off for
those, on for the rest: the default engine).

    python benchmarks/engine/greedy_identity.py --save before.json      # at the old commit
    python benchmarks/engine/greedy_identity.py --compare before.json   # at the new one
"""

from __future__ import annotations

import argparse
import json
import time

from agentspeed.bench.workloads import last_turn_prompts
from agentspeed.engine.llm import LLM
from agentspeed.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="../shared/workloads/agent_traj")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompt-tokens", type=int, default=3000)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", metavar="FILE")
    g.add_argument("--compare", metavar="FILE")
    a = ap.parse_args()
    print(f"command: python benchmarks/engine/greedy_identity.py --workload {a.workload} --sessions {a.sessions} "
          f"--max-tokens {a.max_tokens} --prompt-tokens {a.prompt_tokens} "
          + (f"--save {a.save}" if a.save else f"--compare {a.compare}"))
    llm = LLM(kv_cache_memory=3 << 30)
    assert llm.tokenizer is not None
    prompts = [{"prompt_token_ids": ids}
               for ids in last_turn_prompts(a.workload, llm.tokenizer, a.sessions, a.prompt_tokens)]
    params = [SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True,
                             frequency_penalty=0.5 if i % 3 == 1 else 0.0,
                             presence_penalty=0.3 if i % 3 == 1 else 0.0,
                             logprobs=2 if i % 4 == 2 else None) for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    print(f"{len(prompts)} prompts, {time.perf_counter() - t0:.1f} s")
    got = [{"tokens": list(o.outputs[0].token_ids),
            "logprobs": [[[int(k), round(v, 4)] for k, v in sorted(d.items())] for d in o.outputs[0].logprobs]
            if o.outputs[0].logprobs is not None else None} for o in outs]
    llm.shutdown()
    if a.save:
        with open(a.save, "w") as f:
            json.dump(got, f)
        print(f"saved {len(got)} outputs to {a.save}")
        return
    with open(a.compare) as f:
        want = json.load(f)
    same = 0
    for i, (w, g2) in enumerate(zip(want, got)):
        first = next((j for j, (x, y) in enumerate(zip(w["tokens"], g2["tokens"])) if x != y), None)
        lp_same = w["logprobs"] == g2["logprobs"]
        ok = first is None and len(w["tokens"]) == len(g2["tokens"]) and lp_same
        same += ok
        print(f"session {i}: " + ("identical" if ok else f"tokens differ at {first}, logprobs equal: {lp_same}"))
    print(f"{same}/{len(want)} sessions identical over {a.max_tokens} greedy tokens")


if __name__ == "__main__":
    main()
