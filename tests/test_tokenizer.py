"""The tokenizer loads by the class its directory names, without AutoTokenizer and so without
torch in the API server's process, and behaves exactly as AutoTokenizer's does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from agentspeed.model_source import ModelSource
from agentspeed.tokenizer import Tokenizer, _from_directory

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "List three owls, then say ünïcödé and 漢字."},
    {"role": "assistant", "content": "Barn, snowy, great horned."},
    {"role": "user", "content": "Now call the tool."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TEXTS = ["hello world", "  leading spaces\tand tabs\n\nnew lines", "ünïcödé 漢字 🙂", "<|im_start|>user"]


def _same(ours: object, ref: object) -> None:
    for t in TEXTS:
        for special in (True, False):
            ids = ours.encode(t, add_special_tokens=special)  # type: ignore[attr-defined]
            assert ids == ref.encode(t, add_special_tokens=special)  # type: ignore[attr-defined]
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(  # type: ignore[attr-defined]
                    ids, skip_special_tokens=skip)
    for tools in (None, TOOLS):
        for gen in (True, False):
            kw = {"tokenize": False, "add_generation_prompt": gen, "tools": tools}
            assert ours.apply_chat_template(MESSAGES, **kw) == ref.apply_chat_template(  # type: ignore[attr-defined]
                MESSAGES, **kw)
    assert len(ours) == len(ref)  # type: ignore[arg-type]


def test_gguf_tokenizer_loads_without_torch_and_equals_autotokenizer(tmp_path: Path, smollm2_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold cache (the GGUF conversion runs in a child process), then a warm one: the
    process that loaded it never imports torch; what it encodes and renders equals
    AutoTokenizer's of the same file."""
    code = ("import sys, json\n"
            "from agentspeed.model_source import resolve_model\n"
            "from agentspeed.tokenizer import Tokenizer\n"
            "if __name__ == '__main__':\n"
            f"    tok = Tokenizer.load(resolve_model({str(smollm2_path)!r}))\n"
            "    print(json.dumps(['torch' in sys.modules, tok.encode('hello owls'), tok.vocab_size]))\n")
    env = {**os.environ, "AGENTSPEED_CACHE_DIR": str(tmp_path / "cache")}
    outs = []
    for _ in range(2):  # cold, then warm
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    ref = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    for torch_loaded, ids, vocab in outs:
        assert not torch_loaded
        assert ids == ref.encode("hello owls") and vocab == len(ref)
    monkeypatch.setenv("AGENTSPEED_CACHE_DIR", env["AGENTSPEED_CACHE_DIR"])
    _same(Tokenizer.load(ModelSource("gguf", smollm2_path, "smollm2")).hf, ref)


def test_gguf_tokenizer_of_a_yarn_gpt_oss_file(tmp_path: Path, smollm2_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' GGUF parser fails on GPT-OSS's YaRN keys (every released gpt-oss GGUF
    has them) while building the tokenizer: ours still builds it, equal to the same fields'."""
    import gguf

    src = gguf.GGUFReader(str(smollm2_path))
    path = tmp_path / "oss.gguf"
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    w.add_block_count(1)
    w.add_context_length(131072)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            w.add_key_value(key, field.contents(), vtype, field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(TypeError):  # transformers' own parse (if this stops failing, drop the workaround)
        AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    monkeypatch.setenv("AGENTSPEED_CACHE_DIR", str(tmp_path / "cache"))
    tok = Tokenizer.load(ModelSource("gguf", path, "oss"))
    ref = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    assert tok.encode("hello owls") == ref.encode("hello owls")


@pytest.mark.parametrize("cls", ["TokenizersBackend", "PreTrainedTokenizerFast", "GPT2Tokenizer", "NoSuchTokenizer"])
def test_directory_tokenizer_by_its_class_equals_autotokenizer(tmp_path: Path, smollm2_path: Path, cls: str) -> None:
    """A directory naming its tokenizer class loads by that class (one transformers does not
    export goes through AutoTokenizer) and equals what AutoTokenizer makes of it."""
    AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name).save_pretrained(tmp_path)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "tokenizer_class": cls}))
    ours = _from_directory(tmp_path)
    if cls != "NoSuchTokenizer":
        assert type(ours).__name__ in (cls, "TokenizersBackend")  # (PreTrainedTokenizerFast is an alias)
    _same(ours, AutoTokenizer.from_pretrained(str(tmp_path)))


def test_unwritable_cache_builds_the_tokenizer_in_process(tmp_path: Path, smollm2_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A cache directory that cannot be made (below a file) is a warning, not a failure."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("AGENTSPEED_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level("WARNING", logger="agentspeed.tokenizer"):
        tok = Tokenizer.load(ModelSource("gguf", smollm2_path, "smollm2"))
    assert "could not cache the tokenizer" in caplog.text
    assert tok.encode("hello owls") == AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name).encode("hello owls")
