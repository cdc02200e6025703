"""GPU checks, run on purpose with `pytest -m gpu` on a machine with CUDA (deselected, and
CUDA hidden, otherwise: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentspeed.engine.llm import LLM
from agentspeed.sampling_params import SamplingParams


@pytest.mark.gpu
def test_cuda_greedy_tokens_equal_cpu(tiny_models: dict[str, Path]) -> None:
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11]}, {"prompt_token_ids": [20, 21, 22]}]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(tiny_models["llama"]), device=device, dtype="float32", skip_tokenizer_init=True,
                  page_size=4, num_kv_pages=64)
        outs[device] = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params)]
        llm.shutdown()
    assert outs["cuda"] == outs["cpu"]
