"""DeepSeek-V2/V3 (MLA + MoE) against transformers: greedy tokens identical and logits within
tolerance, through the runner (paged latent cache, awkward page boundaries, batched and alone)
and through the full engine (chunked prefill, prefix-cache hit on a second turn, mixed batch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from test_hf_parity import PROMPTS, assert_end_logits_match, hf_greedy, runner_for

from agentspeed.engine.llm import LLM
from agentspeed.engine.simple_generate import generate
from agentspeed.modeling.layers.mla import MLAttention
from agentspeed.modeling.layers.moe import SparseMoE
from agentspeed.sampling_params import SamplingParams

NEW = 16
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)

YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 128, "mscale": 0.707,
                            "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}}
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "v3-qlora": ("deepseek_v3", {}),
    "v3-no-qlora": ("deepseek_v3", {"q_lora_rank": None}),
    "v3-yarn": ("deepseek_v3", YARN),
    "v3-neox-rope": ("deepseek_v3", {"rope_interleave": False}),
    "v3-dense": ("deepseek_v3", {"first_k_dense_replace": 3}),
    "v2-group-limited": ("deepseek_v2", {}),
    "v2-greedy-no-qlora": ("deepseek_v2", {"topk_method": "greedy", "q_lora_rank": None, "n_group": None,
                                           "topk_group": None}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deepseek")
    return {name: make_tiny(kind, root / name, **kw) for name, (kind, kw) in VARIANTS.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_and_logits_match_transformers(models: dict[str, Path], variant: str) -> None:
    path = models[variant]
    runner = runner_for(path, page_size=5)
    has_moe = any(isinstance(m, SparseMoE) for m in runner.model.modules())
    assert has_moe == (variant != "v3-dense")
    assert any(isinstance(m, MLAttention) for m in runner.model.modules())
    batched = generate(runner, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batched):
        ref_tokens, ref_logits = hf_greedy(path, prompt, NEW)
        assert out.token_ids == ref_tokens
        alone = generate(runner, [prompt], GREEDY)[0]
        assert alone.token_ids == ref_tokens
        assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=5)


def test_latent_cache_layout_and_size(models: dict[str, Path]) -> None:
    runner = runner_for(models["v3-qlora"], page_size=5)
    layer = runner.kv.layers[0]
    assert layer.v is None and layer.k_scale is None
    assert tuple(layer.k.shape) == (64, 5, 32 + 16)  # [pages, page size, kv_lora_rank + rope]
    assert runner.kv.bytes_per_token == 3 * (32 + 16) * 4  # 3 layers, fp32


def test_engine_chunked_prefill_prefix_cache_and_mixed_batch(models: dict[str, Path]) -> None:
    path = models["v3-qlora"]
    llm = LLM(str(path), skip_tokenizer_init=True, page_size=8, max_num_batched_tokens=16, max_num_seqs=4)
    try:
        # a mixed batch, prompts longer than the 16-token budget: chunked prefill
        prompts = [list(range(3, 40)), [7, 8, 9], [11] * 5 + list(range(100, 150)), [200, 201]]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
        for p, o in zip(prompts, outs):
            assert o.outputs[0].token_ids == hf_greedy(path, p, NEW)[0]
        # second turn of the third conversation: its prompt + answer are cached
        turn2 = prompts[2] + outs[2].outputs[0].token_ids + [42, 43, 44, 45]
        o2 = llm.generate({"prompt_token_ids": turn2}, GREEDY)[0]
        assert o2.num_cached_tokens == len(prompts[2]) + NEW - 1  # to the token (partial pages)
        assert o2.outputs[0].token_ids == hf_greedy(path, turn2, NEW)[0]
        pool = llm.engine.scheduler.pool
        pool.check_invariants()
    finally:
        llm.shutdown()


def test_yarn_scales_rope_and_softmax(models: dict[str, Path]) -> None:
    runner = runner_for(models["v3-yarn"], page_size=5)
    attn = next(m for m in runner.model.modules() if isinstance(m, MLAttention))
    # mscale_all_dim 0.707 at factor 4: (0.1 * 0.707 * ln 4 + 1)^2 on top of 1/sqrt(40)
    m = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1
    assert attn.scale == pytest.approx(40**-0.5 * m * m)
