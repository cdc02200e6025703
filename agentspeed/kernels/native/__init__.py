"""Native CPU kernels: C++ sources in this folder, compiled on first use with the machine's
C++ compiler for the CPU it runs on (-march=native) and loaded with ctypes.

Contract:
- `load()` returns the loaded library, or raises NativeBuildError saying why not (no
  compiler, a compile error). It never falls back silently; callers decide what to do.
- Builds are cached under $AGENTSPEED_CACHE_DIR (default ~/.cache/agentspeed)/native/, keyed
  by the source, the flags, the compiler and the CPU's flags, so a changed source or another
  machine rebuilds. Concurrent builders (tensor-parallel ranks) each compile to a temporary
  file and rename it into place, so nobody loads a half-written library.
- The library is plain C ABI with no torch headers (a build takes seconds, not minutes) and
  links the OpenMP runtime torch itself loaded (same soname, libgomp.so.1), so its threads
  are torch's threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from agentspeed.errors import AgentspeedError

SOURCES = ("decode_layers.cpp", "elementwise.cpp", "ggml_gemm_i16.cpp", "ggml_gemm_k8.cpp", "ggml_gemm_q8.cpp", "ggml_i16.cpp", "ggml_linear.cpp", "ggml_moe.cpp", "ggml_q8.cpp", "paged_decode.cpp",
           "paged_prefill.cpp")
HEADERS = ("ggml_blocks.h", "ggml_iblocks.h", "ggml_qblocks.h", "kv_load.h", "vec.h")  # part of the cache key, not compiled on their own
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17")
# Linked without -ffast-math: with it gcc links crtfastmath.o, whose constructor turns on
# flush-to-zero for the whole process as the library loads (torch's maths included).
LINK_FLAGS = ("-shared", "-fopenmp")
ABI_VERSION = 12
ENV_CACHE = "AGENTSPEED_CACHE_DIR"
ENV_CXX = "CXX"
# Extra compiler flags, e.g. "-mno-avx512f" to build (and test) the AVX2 code path on an
# AVX-512 machine. Part of the cache key.
ENV_FLAGS = "AGENTSPEED_NATIVE_FLAGS"


class NativeBuildError(AgentspeedError):
    """The native kernels could not be built or loaded here."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agentspeed")
    return Path(root) / "native"


def _compiler() -> str:
    cxx = os.environ.get(ENV_CXX) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise NativeBuildError("no C++ compiler found (install g++ or set $CXX)")
    return cxx


def build(name: str, sources: Sequence[Path], headers: Sequence[Path] = (), flags: Sequence[str] = FLAGS,
          link_flags: Sequence[str] = LINK_FLAGS, key: str = "") -> Path:
    """Compile `sources` into the shared library `name` (cached; see the module docstring for
    the key and the concurrent-builder rule; `key` adds to the cache key) and return its path."""
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise NativeBuildError(f"C++ compiler {cxx!r} does not run: {e}") from e
    h = hashlib.sha256()
    for part in (version, " ".join(flags), " ".join(link_flags), _cpu_flags(), key,
                 *(f.read_text() for f in (*sources, *headers))):
        h.update(part.encode())
    out = _cache_dir() / h.hexdigest()[:16] / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            objs = [os.path.join(tmp, s.stem + ".o") for s in sources]
            cmds = [[cxx, *flags, "-c", str(s), "-o", o] for s, o in zip(sources, objs)]
            cmds.append([cxx, *objs, *link_flags, "-o", os.path.join(tmp, name)])
            for cmd in cmds:
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise NativeBuildError(f"building {name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
            os.replace(os.path.join(tmp, name), out)
    return out


@cache
def load() -> ctypes.CDLL:
    """The compiled kernel library (built once per source/compiler/CPU, then cached)."""
    here = Path(__file__).parent
    flags = [*FLAGS, *os.environ.get(ENV_FLAGS, "").split()]
    out = build("libagentspeed_native.so", [here / s for s in SOURCES], [here / h for h in HEADERS], flags)
    return open_library(out, "agentspeed_abi_version", ABI_VERSION)


def open_library(path: Path, abi_symbol: str, abi: int) -> ctypes.CDLL:
    """Load a built library and check the ABI version its `abi_symbol()` reports."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeBuildError(f"loading {path} failed: {e}") from e
    got = getattr(lib, abi_symbol)()
    if got != abi:
        raise NativeBuildError(f"{path} has ABI {got}, expected {abi}")
    return lib
