"""RoPE frequency tables, with the "linear", "llama3" and "yarn" scalings."""

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
    if scaling.kind == "yarn":
        return _yarn_inv_frequencies(inv, rot_dim, theta, scaling)
    raise ValueError(f"unsupported rope scaling {scaling.kind!r}")


def _yarn_inv_frequencies(inv: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    # YaRN: frequencies that complete many rotations within the original context keep their
    # value (extrapolate), slow ones are divided by factor (interpolate), with a linear ramp
    # between the two correction dimensions.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the extrapolated (original) frequency
    return (inv / s.factor) * (1 - keep) + inv * keep


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: RopeScaling | None) -> float:
    """What cos/sin are multiplied by (YaRN's magnitude correction; 1 otherwise)."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return _yarn_mscale(scaling.factor)


def softmax_scale_factor(scaling: RopeScaling | None) -> float:
    """DeepSeek multiplies its softmax scale by mscale(factor, mscale_all_dim)^2 under YaRN."""
    if scaling is None or not scaling.mscale_all_dim:
        return 1.0
    m = _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return m * m


def cos_sin_table(
    rot_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None, device: str,
    freq_factors: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """[max_positions, rot_dim] float32: cos of each frequency, then sin. freq_factors
    (rot_dim/2 divisors, GGUF rope_freqs) divide the scaled inverse frequencies."""
    inv = inv_frequencies(rot_dim, theta, scaling)
    if freq_factors is not None:
        if len(freq_factors) != rot_dim // 2:
            raise ValueError(f"{len(freq_factors)} rope frequency factors for a rotary dim of {rot_dim}")
        inv = inv / torch.tensor(freq_factors, dtype=torch.float32)
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    f = attention_factor(scaling)
    return (table * f if f != 1.0 else table).to(device)
