"""Greedy tokens with the default CPU linears (16-bit activations above 8 rows where the CPU
has AVX512-VNNI) against `--kernel-backend linear=cpu_native_fp32` (fp32 at every size), on
the default model and real agent conversations: each session's last recorded turn, rendered
with the chat template, its last --prompt-tokens tokens, all prompts in one batch (so
prefill and batched decodes with drafts both take the many-row path).

    python benchmarks/model/linear_agreement.py [--sessions 16] [--max-tokens 96] [--prompt-tokens 3000]
"""

from __future__ import annotations

import argparse
import time

from agentspeed.bench.workloads import last_turn_prompts
from agentspeed.engine.llm import LLM
from agentspeed.sampling_params import SamplingParams

FP32 = "linear=cpu_native_fp32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="../shared/workloads/agent_traj")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompt-tokens", type=int, default=3000)
    a = ap.parse_args()
    print(f"command: python benchmarks/model/linear_agreement.py --workload {a.workload} --sessions {a.sessions} "
          f"--max-tokens {a.max_tokens} --prompt-tokens {a.prompt_tokens}")
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[list[int]]] = {}
    for backend in (FP32, "default"):
        llm = LLM(kernel_backend=None if backend == "default" else backend, kv_cache_memory=3 << 30)
        assert llm.tokenizer is not None
        prompts = [{"prompt_token_ids": ids}
                   for ids in last_turn_prompts(a.workload, llm.tokenizer, a.sessions, a.prompt_tokens)]
        t0 = time.perf_counter()
        tokens[backend] = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params)]
        print(f"{backend}: {len(prompts)} prompts of {min(len(p['prompt_token_ids']) for p in prompts)}-"
              f"{max(len(p['prompt_token_ids']) for p in prompts)} tokens, {time.perf_counter() - t0:.1f} s")
        del llm
    same = 0
    for i, (want, got) in enumerate(zip(tokens[FP32], tokens["default"])):
        first = next((j for j, (x, y) in enumerate(zip(want, got)) if x != y), None)
        same += first is None
        print(f"session {i}: " + ("identical" if first is None else f"first difference at token {first}"))
    print(f"{same}/{len(tokens[FP32])} sessions identical over {a.max_tokens} greedy tokens")


if __name__ == "__main__":
    main()
