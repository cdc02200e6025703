"""Tokenizer and chat template, from a Hugging Face directory or from GGUF metadata
(both through transformers; nothing downloaded).

transformers builds a GGUF file's tokenizer from its vocabulary in Python (9 s for a
49K-token vocabulary); the result is saved once under the cache directory, keyed by the
file's path, size and modification time, and later loads read that (well under a second).

The tokenizer class named in a directory's tokenizer_config.json is loaded directly rather
than through AutoTokenizer, whose config machinery imports torch: the API server's process
then holds no torch (123 MiB against 308 MiB resident with the SmolLM2 tokenizer). The GGUF
conversion, which needs torch, runs in a child process for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
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
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_root() / key
    if (cached / "tokenizer_config.json").exists():
        try:
            return _from_directory(cached)
        except Exception as e:  # a damaged cache entry: rebuild it
            log.warning("ignoring the cached tokenizer %s: %s", cached, e)
    log.info("building the tokenizer of %s from its GGUF metadata (once; cached in %s)", path.name, cached)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        built, why = pool.apply(_convert_gguf, (str(path), str(cached)))
    if not built:
        raise ModelLoadError(why)
    if (cached / "tokenizer_config.json").exists():  # (ours, or a concurrent loader's)
        return _from_directory(cached)
    log.warning("could not cache the tokenizer of %s (%s): building it here", path, why)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _convert_gguf(path: str, cached: str) -> tuple[bool, str]:
    """(In a child process.) Build the GGUF file's tokenizer and save it to `cached`:
    (False, why) if the file has none, (True, why not saved or "")."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    p = Path(path)
    try:
        hf = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:
        # transformers parses the model's metadata too, and fails on some it need not read for
        # a tokenizer (GPT-OSS's YaRN keys: it reads each value's key-length part, as of 5.x):
        # retry on a copy of the metadata without RoPE scaling or tensors.
        hf = _without_rope_scaling(p)
        if hf is None:
            return False, f"cannot build a tokenizer from {path}: {e}"
    try:  # written aside and renamed, so a concurrent reader never sees half of it
        Path(cached).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(cached).parent) as tmp:
            hf.save_pretrained(tmp)
            os.replace(tmp, cached)
    except OSError as e:  # (a concurrent loader's rename won, or the cache is not writable)
        return True, str(e)
    return True, ""


def _without_rope_scaling(path: Path) -> Any:
    """AutoTokenizer of a copy of the file's metadata without its RoPE-scaling keys or tensors;
    None where it has no such keys or that fails too."""
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(path))
    if not any(".rope.scaling." in k for k in reader.fields):
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            w = gguf.GGUFWriter(str(Path(tmp) / path.name), str(reader.fields["general.architecture"].contents()))
            for key, field in reader.fields.items():
                if key.startswith("GGUF.") or key == "general.architecture" or ".rope.scaling." in key:
                    continue
                vtype = field.types[0]
                sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), vtype, sub)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.close()
            return AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
    except Exception:
        return None


def _from_directory(path: Path) -> Any:
    """The tokenizer saved in `path`, by the class its tokenizer_config.json names (without
    AutoTokenizer, see the module docstring) where transformers exports that class."""
    import transformers

    name = None
    cfg = path / "tokenizer_config.json"
    if cfg.exists():
        name = json.loads(cfg.read_text()).get("tokenizer_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        from transformers import AutoTokenizer

        log.info("tokenizer class %r of %s: through AutoTokenizer (which imports torch)", name, path)
        return AutoTokenizer.from_pretrained(str(path))
    return cls.from_pretrained(str(path))


class Tokenizer:
    def __init__(self, hf: Any, eos_token_ids: Sequence[int], chat_template: str | None = None) -> None:
        self.hf = hf
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        if chat_template is not None:
            self.hf.chat_template = chat_template

    @staticmethod
    def load(source: ModelSource, chat_template: str | None = None) -> Tokenizer:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        try:
            hf = _gguf_tokenizer(source.path) if source.format == "gguf" else _from_directory(source.path)
        except ModelLoadError:
            raise
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
