"""RoPE frequency tables, with the "linear" and "llama3" scalings."""

from __future__ import annotations

import math

import torch

from agentspeed.config import RopeScaling


def inv_frequencies(rot_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind == "llama3":
        # Long wavelengths are divided by `factor`, short ones kept, the band between
        # interpolated smoothly (Llama 3.1's recipe).
        old = scaling.original_max_position_embeddings
        low_wl = old / scaling.low_freq_factor
        high_wl = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / scaling.factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {scaling.kind!r}")


def cos_sin_table(
    rot_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None, device: str
) -> torch.Tensor:
    """[max_positions, rot_dim] float32: cos of each frequency, then sin."""
    inv = inv_frequencies(rot_dim, theta, scaling)
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
