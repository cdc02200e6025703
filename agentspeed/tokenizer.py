"""Tokenizer and chat template, from a Hugging Face directory or from GGUF metadata
(both through transformers; nothing downloaded).

transformers builds a GGUF file's tokenizer from its vocabulary in Python (9 s for a
49K-token vocabulary); the result is saved once under the cache directory, keyed by the
file's path, size and modification time, and later loads read that (well under a second)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentspeed.errors import ConfigError, ModelLoadError
from agentspeed.model_source import ModelSource

log = logging.getLogger(__name__)

Message = dict[str, Any]


def _cache_root() -> Path:
    root = os.environ.get("AGENTSPEED_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agentspeed")
    return Path(root) / "tokenizers"


def _gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_root() / key
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception as e:  # a damaged cache entry: rebuild it
            log.warning("ignoring the cached tokenizer %s: %s", cached, e)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:  # written aside and renamed, so a concurrent reader never sees half of it
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            hf.save_pretrained(tmp)
            os.replace(tmp, cached)
    except OSError as e:
        log.warning("could not cache the tokenizer of %s: %s", path, e)
    return hf


class Tokenizer:
    def __init__(self, hf: Any, eos_token_ids: Sequence[int], chat_template: str | None = None) -> None:
        self.hf = hf
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        if chat_template is not None:
            self.hf.chat_template = chat_template

    @staticmethod
    def load(source: ModelSource, chat_template: str | None = None) -> Tokenizer:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        try:
            if source.format == "gguf":
                hf = _gguf_tokenizer(source.path)
            else:
                hf = AutoTokenizer.from_pretrained(str(source.path))
        except Exception as e:
            raise ModelLoadError(f"cannot load a tokenizer for {source.path}: {e}") from None
        eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
        return Tokenizer(hf, eos, chat_template)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> list[int]:
        """Render with the model's template (tools and extra template variables passed
        through) and encode. Raises ConfigError without a template, ValueError if the
        template rejects the conversation."""
        if not getattr(self.hf, "chat_template", None):
            raise ConfigError("this model has no chat template: send raw text or pass --chat-template")
        try:
            text = self.hf.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools,
                **kwargs,
            )
        except Exception as e:  # jinja2 errors raised by the template itself (raise_exception)
            raise ValueError(f"the chat template rejected the messages: {e}") from None
        # The template already contains any BOS token; do not add another.
        return self.encode(text, add_special_tokens=False)
