"""A GGUF file's header, read in one pass: metadata and tensor directory, with each tensor's
bytes a view of one memory map of the file.

Why not `gguf.GGUFReader`: it builds a numpy view per metadata element, and a model's
vocabulary is ~10^5 strings; on a 1.5B Q4_K_M file with SmolLM2's tokenizer it took 4.5 s of
a 5.4 s load, against well under a second here. String arrays are skipped (their length is
kept): the tokenizer is read by transformers, not from here. Format: ggml's docs/gguf.md.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
# GGUF value types -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True, slots=True)
class StringArray:
    """A metadata array of strings, not decoded (only its length is needed here)."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    tensor_type: int
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    n_bytes: int
    data: np.ndarray  # uint8 view of the mapping, n_bytes long


class GgufFile:
    """`fields` (key -> int, float, str, bool, numpy array or StringArray) and `tensors`.
    Raises ValueError for a file that is not GGUF or is cut short."""

    def __init__(self, path: Path | str) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        with open(path, "rb") as f:
            # Private (copy-on-write) and read-only in use: the pages are the page cache's.
            self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        buf = memoryview(self._map)
        self._buf, self._off = buf, 0
        if bytes(buf[:4]) != MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        self._off = 4
        version, n_tensors, n_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
            infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._off // align) * align
        whole = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors: list[TensorInfo] = []
        for name, dims, qtype, offset in infos:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            n = int(np.prod(dims)) // block * nbytes
            lo = start + offset
            if lo + n > len(whole):
                raise ValueError(f"tensor {name} is cut short")
            self.tensors.append(TensorInfo(name, qtype, dims, n, whole[lo: lo + n]))

    def _unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self._buf, self._off)[0]
        self._off += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._unpack("<Q")
        s = bytes(self._buf[self._off: self._off + n]).decode("utf-8", errors="replace")
        self._off += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self._unpack("<I"), self._unpack("<Q")
        if etype in _NUMPY:
            arr: np.ndarray = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=count, offset=self._off).copy()
            self._off += arr.nbytes
            return arr
        if etype == 8:
            for _ in range(count):  # skipped, not decoded
                self._off += 8 + struct.unpack_from("<Q", self._buf, self._off)[0]
            return StringArray(count)
        return [self._value(etype) for _ in range(count)]
