"""Loaders: bad input gives a one-line error (library and CLI), sharded safetensors load,
the default model is found through its package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentspeed.config import CacheConfig, EngineConfig
from agentspeed.control.plan import ScheduledChunk
from agentspeed.errors import ModelLoadError, UnsupportedModelError
from agentspeed.execution.model_runner import ModelRunner
from agentspeed.model_source import resolve_model


def runner(path: Path | str) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(path), cache=CacheConfig(num_pages=16)))


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentspeed.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model path not found"):
        resolve_model(str(tmp_path / "nope"))
    assert_one_line_error(cli("generate", "hi", "--model", str(tmp_path / "nope")), "model path not found")


def test_unknown_architecture(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "gpt2ish"
    shutil.copytree(tiny_models["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture"):
        runner(bad)
    assert_one_line_error(cli("generate", "hi", "--raw", "--model", str(bad)), "unsupported architecture")


def test_truncated_gguf(smollm2_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_path.open("rb") as f:
        cut.write_bytes(f.read(3_000_000))
    with pytest.raises(ModelLoadError, match="corrupt or truncated GGUF"):
        runner(cut)
    assert_one_line_error(cli("generate", "hi", "--model", str(cut)), "corrupt or truncated GGUF")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"definitely not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        runner(junk)


def test_truncated_safetensors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "cut"
    shutil.copytree(tiny_models["llama"], bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated safetensors"):
        runner(bad)


def test_directory_without_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither"):
        runner(tmp_path)


def test_missing_weight_is_named(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "missing"
    shutil.copytree(tiny_models["llama"], bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        runner(bad)


def test_sharded_safetensors_equal_single(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"]).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    chunk = [ScheduledChunk("x", [1, 2, 3, 4, 5], 0, [1])]
    torch.testing.assert_close(runner(sharded).forward(chunk), runner(tiny_models["qwen3"]).forward(chunk))


def test_default_model_cli_generates_text() -> None:
    proc = cli("generate", "What is the capital of France?", "--max-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    # only the completion on stdout: no chat-template markers, no logs
    assert "<|im_start|>" not in proc.stdout and "INFO" not in proc.stdout


def test_cli_help_explains() -> None:
    proc = cli("generate", "--help")
    assert proc.returncode == 0
    for flag in ("--model", "--max-tokens", "--temperature", "--top-p", "--raw", "--tp", "--kernel-backend"):
        assert flag in proc.stdout
