"""Gemma 3 (sliding-window and global layers, GeGLU, pre/post norms, q/k norm, scaled
embeddings, per-layer-type RoPE) against transformers: greedy tokens identical and logits
within tolerance, through the runner (windows crossing page boundaries) and the engine
(chunked prefill, prefix-cache hit on a second turn); and the sliding-window kernels
against the reference with the window cutting through pages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from test_hf_parity import (
    PROMPTS,
    assert_end_logits_match,
    check_engine_turns,
    hf_greedy,
    runner_for,
)

from agentspeed.engine.simple_generate import generate
from agentspeed.modeling.layers.attention import PagedAttention
from agentspeed.sampling_params import SamplingParams

NEW = 16
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("gemma3", tmp_path_factory.mktemp("gemma3"))


def test_config_reads_windows_rope_bases_and_scale(gemma: Path) -> None:
    runner = runner_for(gemma, page_size=5)
    cfg = runner.model_config
    assert (cfg.sliding_window, cfg.sliding_layers, cfg.hidden_act) == (11, (True, False), "gelu_tanh")
    assert cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1000000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear"
    attn = [m for m in runner.model.modules() if isinstance(m, PagedAttention)]
    assert [(a.window, a.local_rope) for a in attn] == [(11, True), (None, False)]
    assert attn[0].scale == pytest.approx(24**-0.5)
    # the windowed layer keeps the model's attention kernels (the native ones read only the
    # window); the global layer keeps the model's kernel set itself
    for op in ("paged_attention_prefill", "paged_attention_decode"):
        assert attn[0].kernels.backends[op] == runner.kernels.backends[op]
    assert attn[1].kernels is runner.kernels


def test_greedy_tokens_and_logits_match_transformers(gemma: Path) -> None:
    # page size 5 and an 11-token window: every window starts mid-page
    runner = runner_for(gemma, page_size=5)
    batched = generate(runner, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batched):
        ref_tokens, ref_logits = hf_greedy(gemma, prompt, NEW)
        assert out.token_ids == ref_tokens
        assert generate(runner, [prompt], GREEDY)[0].token_ids == ref_tokens
        assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=5)


def test_window_matters(gemma: Path, tmp_path: Path) -> None:
    """The same weights with the window as long as the context give other logits (the
    test above would catch a kernel that ignores the window)."""
    import json
    import shutil

    wide = tmp_path / "wide"
    shutil.copytree(gemma, wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "sliding_window": 512}))
    prompt = PROMPTS[1]
    _, narrow_logits = hf_greedy(gemma, prompt, 1)
    _, wide_logits = hf_greedy(wide, prompt, 1)
    assert not torch.allclose(narrow_logits, wide_logits, atol=1e-3)


def test_engine_chunked_prefill_and_prefix_cache(gemma: Path) -> None:
    check_engine_turns(gemma)


def test_gguf_matches_transformers(tmp_path: Path) -> None:
    """llama.cpp's gemma3 layout: norms stored as 1 + w, ffn_norm the pre-MLP norm, post
    norms, the window and the sliding RoPE base in metadata, a bool-array layer pattern.
    GGUF has no query_pre_attn_scalar (llama.cpp derives it: head_dim, as in every Gemma 3
    but the 27B), so this model's is head_dim."""
    from gguf_writer import write_gguf

    gemma = make_tiny("gemma3", tmp_path, query_pre_attn_scalar=16)
    path = write_gguf(gemma, tmp_path / "gemma3.gguf", "F32", "gemma3")
    runner = runner_for(path, page_size=5)
    cfg = runner.model_config
    assert (cfg.sliding_window, cfg.sliding_layers, cfg.rope_local_theta) == (11, (True, False), 10000.0)
    for prompt in PROMPTS[1:]:
        ref_tokens, ref_logits = hf_greedy(gemma, prompt, NEW)
        assert generate(runner, [prompt], GREEDY)[0].token_ids == ref_tokens
        assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=5)


def test_gguf_pattern_default_is_every_sixth_layer_global() -> None:
    from agentspeed.modeling.loaders.gguf_loader import _gemma3

    fields = {"block_count": 12, "attention.key_length": 256, "attention.sliding_window": 512}
    out = _gemma3(lambda k, d=None: fields.get(k, d), 8, 2048)
    assert out["sliding_layers"] == tuple(i % 6 != 5 for i in range(12))
    assert out["attn_scale"] == 256**-0.5 and out["rope_local_theta"] == 10000.0


def test_multimodal_checkpoint_serves_its_language_model(tmp_path: Path) -> None:
    """Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration (text_config, weights under
    language_model., a vision tower beside): served text-only, equal to transformers' own
    multimodal model on text."""
    from test_hf_parity import hf_greedy_loop
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = make_tiny("gemma3", tmp_path / "text")
    import json

    tc = json.loads((text / "config.json").read_text())
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4, image_token_index=383,
                       boi_token_index=381, eoi_token_index=382)
    torch.manual_seed(0)
    mm = Gemma3ForConditionalGeneration(cfg).eval()
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32)
    mm.model.language_model.load_state_dict(lm.model.state_dict())
    path = tmp_path / "mm"
    mm.save_pretrained(path)
    runner = runner_for(path, page_size=5)
    assert runner.model_config.architecture == "Gemma3ForCausalLM"
    prompt = PROMPTS[1]
    ref_tokens, ref_logits = hf_greedy_loop(mm, prompt, NEW)
    assert generate(runner, [prompt], GREEDY)[0].token_ids == ref_tokens
    assert_end_logits_match(runner, prompt, ref_tokens, ref_logits, page_size=5)
