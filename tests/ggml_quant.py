"""A reference quantizer (numpy) for ggml's block types, for test data: the `gguf` package
quantizes Q4_0..Q8_0, MXFP4, F16 and BF16 but only dequantizes the K-quants, so Q2_K..Q6_K are
packed here. Plain round-to-nearest against per-block ranges (not llama.cpp's searched
scales): what matters for tests is that the bytes are valid blocks in ggml's layout, which
`test_ggml.py` checks by round-tripping them through the `gguf` package's dequantizer.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

TYPES = ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4")


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _scales(per_sub: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Super-block scale (fp16) and integer sub-scales 0..levels for non-negative per_sub [B, S]."""
    d = _f16(per_sub.max(-1) / levels)
    sub = np.clip(np.rint(_div(per_sub, d.astype(np.float32)[:, None])), 0, levels)
    return d, sub.astype(np.int32)


def _k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12-byte packing of 8 six-bit scales and mins (Q4_K/Q5_K) [B, 12]."""
    q = np.zeros((sc.shape[0], 12), np.uint8)
    for j in range(4):
        q[:, j] = sc[:, j] | ((sc[:, j + 4] >> 4) << 6)
        q[:, j + 4] = mn[:, j] | ((mn[:, j + 4] >> 4) << 6)
        q[:, j + 8] = (sc[:, j + 4] & 15) | ((mn[:, j + 4] & 15) << 4)
    return q


def _scale_min(x: np.ndarray, levels: int, sub_levels: int) -> tuple[np.ndarray, ...]:
    """Affine sub-blocks x [B, S, n] = d*sc*q - dmin*m: (d, dmin, sc, m, q)."""
    lo = np.maximum(-x.min(-1), 0)
    step = (x.max(-1) + lo) / levels
    d, sc = _scales(step, sub_levels)
    dmin, m = _scales(lo, sub_levels)
    scale = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint(_div(x + offset[..., None], np.broadcast_to(scale[..., None], x.shape))), 0, levels)
    return d, dmin, sc, m, q.astype(np.int32)


def _symmetric(x: np.ndarray, lo: int, hi: int, sub_levels: int) -> tuple[np.ndarray, ...]:
    """Signed sub-blocks x [B, S, n] = d*sc*q, q in [lo, hi]: (d, sc, q)."""
    step = np.abs(x).max(-1) / -lo
    d, sc = _scales(step, sub_levels)
    scale = d.astype(np.float32)[:, None] * sc
    q = np.clip(np.rint(_div(x, np.broadcast_to(scale[..., None], x.shape))), lo, hi)
    return d, sc, q.astype(np.int32)


def _q2_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min(x.reshape(-1, 16, 16), 3, 15)
    q = q.reshape(-1, 2, 4, 2, 16)  # [half, shift j, part, l]
    qs = np.zeros((x.shape[0], 2, 2, 16), np.uint8)
    for j in range(4):
        qs |= (q[:, :, j] << (2 * j)).astype(np.uint8)
    scales = (sc | (m << 4)).astype(np.uint8)
    return np.concatenate([scales, qs.reshape(-1, 64), d.view(np.uint8).reshape(-1, 2),
                           dmin.view(np.uint8).reshape(-1, 2)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    d, sc, q = _symmetric(x.reshape(-1, 16, 16), -4, 3, 31)
    s = (sc + 32).astype(np.uint8)  # stored biased by 32
    q = (q + 4).reshape(-1, 2, 4, 32)  # [half, j, i = part * 16 + l]
    qs = np.zeros((x.shape[0], 2, 32), np.uint8)
    hmask = np.zeros((x.shape[0], 32), np.uint8)
    for h in range(2):
        for j in range(4):
            qs[:, h] |= ((q[:, h, j] & 3) << (2 * j)).astype(np.uint8)
            hmask |= ((q[:, h, j] >> 2) << (h * 4 + j)).astype(np.uint8)
    packed = np.zeros((x.shape[0], 12), np.uint8)
    for i in range(4):
        packed[:, i] = (s[:, i] & 15) | ((s[:, i + 8] & 15) << 4)
        packed[:, 4 + i] = (s[:, 4 + i] & 15) | ((s[:, 12 + i] & 15) << 4)
        packed[:, 8 + i] = ((s[:, i] >> 4) | ((s[:, 4 + i] >> 4) << 2) | ((s[:, 8 + i] >> 4) << 4)
                            | ((s[:, 12 + i] >> 4) << 6))
    return np.concatenate([hmask, qs.reshape(-1, 64), packed, d.view(np.uint8).reshape(-1, 2)], axis=1)


def _q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min(x.reshape(-1, 8, 32), 2**bits - 1, 63)
    q = q.reshape(-1, 4, 2, 32)  # [chunk j, low/high, l]
    qs = ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).astype(np.uint8).reshape(-1, 128)
    head = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _k4_scales(sc, m)]
    if bits == 4:
        return np.concatenate([*head, qs], axis=1)
    qh = np.zeros((x.shape[0], 32), np.uint8)
    for j in range(4):
        for half in range(2):
            qh |= ((q[:, j, half] >> 4) << (2 * j + half)).astype(np.uint8)
    return np.concatenate([*head, qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    d, sc, q = _symmetric(x.reshape(-1, 16, 16), -32, 31, 127)
    q = (q + 32).reshape(-1, 2, 4, 32)  # [half, quadrant g, l]
    ql = np.zeros((x.shape[0], 2, 64), np.uint8)
    ql[:, :, :32] = (q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4)
    ql[:, :, 32:] = (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)
    qh = np.zeros((x.shape[0], 2, 32), np.uint8)
    for g in range(4):
        qh |= ((q[:, :, g] >> 4) << (2 * g)).astype(np.uint8)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           d.view(np.uint8).reshape(-1, 2)], axis=1)


_K = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": lambda x: _q45_k(x, 4), "Q5_K": lambda x: _q45_k(x, 5),
      "Q6_K": _q6_k}


def quantize(w: np.ndarray, name: str) -> np.ndarray:
    """w [N, K] float32 as ggml type `name`: uint8 [N, row bytes] (F16: float16 [N, K], as the
    `gguf` package keeps it)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if name in _K:
        n, k = w.shape
        assert k % 256 == 0, f"{name} needs whole 256-weight blocks"
        return _K[name](w.reshape(-1, 256)).reshape(n, -1)
    return gguf_quantize(w, T[name])
