"""Packed GGUF weights (kernels/ggml.py, kernels/cpu_ggml.py, native/ggml_linear.cpp): every
native type against float64 products of the `gguf` package's dequantized weights, slices as
tensor parallelism takes them, and tiny models stored in each type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from ggml_quant import TYPES, quantize
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf_writer import write_gguf

from agentspeed.kernels import cpu_native
from agentspeed.kernels.ggml import NATIVE_TYPES, GgmlLinear, GgmlWeight

needs_native = pytest.mark.skipif(cpu_native._fn is None, reason=f"native kernels unavailable: {cpu_native._UNAVAILABLE}")
U = 2.0**-24  # fp32 unit roundoff


def packed(name: str, n: int, k: int, seed: int = 0) -> tuple[GgmlWeight, torch.Tensor]:
    """A random weight stored as `name`, and its float64 value by the gguf package's decoder."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.1
    raw = quantize(w, name)
    ref = gguf_dequantize(raw, T[name]) if name != "F16" else raw.astype(np.float32)
    return GgmlWeight.of(T[name].value, (n, k), raw), torch.from_numpy(np.asarray(ref, np.float64).reshape(n, k))


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case fp32 error of the kernels' sums of the stored values, in any order: (K + 4) u
    sum_k |x_k| (|w_k| + 2 max |w| of its 32-weight block). The 2 max|w| term covers the 1-2
    row kernel, which sums d * sum(code * x) - m * sum(x) per sub-block: |d code| and |m| are
    each at most about a block's largest |w| (the minimum sits at the block's most negative
    weight); the many-row kernel sums decoded weights and meets the tighter (K + 2) u sum |x w|."""
    n, k = w.shape
    block_max = w.abs().reshape(n, k // 32, 32).amax(-1, keepdim=True).expand(n, k // 32, 32).reshape(n, k)
    return (k + 4) * U * (x.double().abs() @ (w.abs() + 2 * block_max).T)


def i16_bound(x: torch.Tensor, w: torch.Tensor, qmax: int = 16383) -> torch.Tensor:
    """The decode kernels' extra error (native/ggml_i16.cpp, ggml_q8.cpp): each activation is
    rounded to a multiple of its 256 columns' max|x| / qmax (16383 for int16, 127 for int8),
    so it is off by at most half of that (and a little fp32 rounding of the scaled value):
    sum_k |w_k| dx(k) / 2."""
    r, k = x.shape
    xb = torch.nn.functional.pad(x.double().abs(), (0, -k % 256)).reshape(r, -1, 256)
    dx = (xb.amax(-1) / qmax).repeat_interleave(256, 1)[:, :k]
    return (dx * 0.5 * (1 + 1e-5) + x.double().abs() * U) @ w.abs().T


def rounding_bound(name: str, rows: int, mode: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | float:
    """The activation rounding's bound for the path cpu_ggml.linear takes (0 for fp32)."""
    kind = rounding(name, rows, mode, x.shape[1])
    return 0.0 if kind is None else i16_bound(x, w, 127 if kind == "int8" else 16383)


def test_ggml_kernels_cover_the_types_people_download() -> None:
    assert sorted(v[0] for v in NATIVE_TYPES.values()) == sorted(TYPES)
    for qtype, (name, qk, nbytes) in NATIVE_TYPES.items():
        from gguf import GGML_QUANT_SIZES

        assert T[name].value == qtype
        assert name in ("F16", "BF16") or GGML_QUANT_SIZES[T[name]] == (qk, nbytes)


@pytest.mark.parametrize("name", TYPES)
def test_reference_quantizer_writes_valid_blocks(name: str) -> None:
    """The test data's own check: quantize, decode with the gguf package, and land within a
    step of the original (a layout mistake lands far off)."""
    w = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    raw = quantize(w, name)
    back = raw.astype(np.float32) if name == "F16" else gguf_dequantize(raw, T[name])
    # MXFP4: e2m1 codes under a power-of-two scale that clips a block's largest values
    # (OCP MX's rule, the gguf package's quantizer): measured 0.2 of max|w| here.
    bits = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6,
            "Q8_0": 8, "BF16": 8, "F16": 11, "MXFP4": 3}[name]
    err = np.abs(back.reshape(w.shape) - w).max()
    assert err < 6 * np.abs(w).max() / 2**bits, (name, err)


def rounding(name: str, rows: int, mode: str, k: int) -> str | None:
    """How cpu_ggml.linear rounds the activations (its docstring's table): "int8", "int16"
    or None (fp32)."""
    from agentspeed.kernels import cpu_ggml

    if mode == "exact" or T[name].value not in cpu_ggml.I16_TYPES:
        return None
    if mode == "auto" and k % 256 == 0 and int8_rows(name)(rows):
        return "int8"
    return "int16" if mode == "int16" or rows <= cpu_ggml.I16_ROWS else None


def int8_rows(name: str) -> Callable[[int], bool]:
    """For a weight type, which row counts cpu_ggml.linear rounds to int8 in mode auto (K
    whole 256-column blocks): for the K-quants decode steps (ggml_linear_q8), and more than 8
    rows where this build has the VNNI loop of ggml_gemm_q8 or the AVX2 loop of ggml_gemm_k8."""
    from agentspeed.kernels import cpu_ggml

    value = T[name].value
    decode = value in cpu_ggml.Q8_TYPES
    many = cpu_ggml.MANY_INT8 is not None and decode
    return lambda rows: decode if rows <= cpu_ggml.I16_ROWS else many


def test_int8_decode_types_are_the_k_quants() -> None:
    from agentspeed.kernels import cpu_ggml

    assert sorted(NATIVE_TYPES[t][0] for t in cpu_ggml.Q8_TYPES) == ["Q4_K", "Q5_K", "Q6_K"]
    assert sorted(NATIVE_TYPES[t][0] for t in cpu_ggml.GEMM_Q8_TYPES) == [
        "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]


GEMM_Q8_NAMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]
# The many-row int8 kernels and the types each reads: ggml_gemm_q8 (fp32 sub-block scales; VNNI)
# and ggml_gemm_k8 (integer sub-block scales; AVX2).
GEMM_KERNELS = [*(("q8", n) for n in GEMM_Q8_NAMES), *(("k8", n) for n in K_QUANTS)]


def check_gemm_q8(name: str, rows: int, seed: int = 0, kernel: str = "q8") -> None:
    """ggml_gemm_q8 or ggml_gemm_k8 (this build's loop) on a merged projection of two parts, one a row slice
    with a gap after it (83 + 40 rows: partial 32-row panels; 768 columns: 3 activation scales):
    the float64 product of its own int8 rounding of x to fp32's accuracy, and the float64
    product of x within the rounding's bound; uncovered rows stay zero."""
    from agentspeed.kernels import cpu_ggml

    w, ref = packed(name, 90, 768, seed=seed)
    v, vref = packed(name, 40, 768, seed=seed + 1)
    lin = GgmlLinear(130, ((0, w.rows(3, 86)), (90, v)))
    wref = torch.zeros(130, 768, dtype=torch.float64)
    wref[:83], wref[90:] = ref[3:86], vref
    x = torch.randn(rows, 768)
    x[:, 300] *= 50
    bias = torch.randn(130)
    got = cpu_ggml.gemm_q8(x, lin, bias, kernel=kernel).double()
    xq, dx = cpu_ggml.quantize_q8(x)
    xhat = xq.double() * dx.double().repeat_interleave(256, 1)
    b = bias.double() * (wref != 0).any(1)  # the parts' rows take the bias, the gap none
    err = (got - xhat @ wref.T - b).abs()
    assert (err <= bound(xhat, wref) + 1e-6).all(), f"{kernel} {name} rows={rows}: max err {err.max():.3g}"
    full = (got - x.double() @ wref.T - b).abs()
    assert (full <= bound(x, wref) + i16_bound(x, wref, 127) + 1e-6).all()
    assert not got[:, 83:90].any()


@needs_native
@pytest.mark.parametrize(("kernel", "name"), GEMM_KERNELS)
@pytest.mark.parametrize("rows", [1, 3, 5, 9, 34, 130])  # register tiles of 3 and 4 rows and their remainders
def test_int8_gemm_within_its_bound(kernel: str, name: str, rows: int) -> None:
    check_gemm_q8(name, rows, seed=rows, kernel=kernel)


@needs_native
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 13, 40, 129])
def test_linear_within_its_bound(name: str, rows: int) -> None:
    """Every path against float64, in each mode: int16 activations (fp32 bound + rounding
    bound) up to 8 rows of an integer type, and at every row count in mode int16 (the tiled
    kernel above 8); fp32 products otherwise (the tiles up to 128 rows, dequantized panels
    through sgemm above)."""
    from agentspeed.kernels import cpu_ggml

    w, ref = packed(name, 83, 768, seed=rows)  # 83: not a multiple of any tile; 768: 3 scales of x
    x = torch.randn(rows, 768)
    x[:, 300] *= 50  # an outlier column: its 256 columns get a coarser scale
    bias = torch.randn(83)
    lin = GgmlLinear(83, ((0, w),))
    want = x.double() @ ref.T + bias.double()
    for mode in cpu_ggml.MODES:
        got = cpu_native.linear(x, lin, bias, mode=mode).double()
        err = (got - want).abs()
        kind = rounding(name, rows, mode, 768)
        limit = bound(x, ref) + rounding_bound(name, rows, mode, x, ref) + 1e-6
        assert (err <= limit).all(), f"{name} rows={rows} {mode}: max err {err.max():.3g}"
        if kind:  # the rounding shows (so this path ran), within a bound that is not loose
            assert err.max() > 0 and (err / limit).max() > 1e-3
        if kind == "int8":  # coarser than int16 would be: the int8 kernel ran, not the int16 one
            assert err.max() > 3 * i16_bound(x, ref).max()
    assert cpu_native.linear(x[None], lin, None).shape == (1, rows, 83)


@needs_native
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "Q2_K"])
@pytest.mark.parametrize("rows", [3, 24])  # the decode kernel and the tiled one
def test_int16_activations_stay_exact_in_integers_at_their_extremes(name: str, rows: int) -> None:
    """The largest codes times the largest activations (Q6_K: 4096 * 16383 per product, a
    256-weight block's int32 lane two products short of overflow): equal to float64 of the
    rounded activations to fp32 precision, and no wrap-around."""
    from agentspeed.kernels import cpu_ggml

    n, k = 16, 512
    w = np.where(np.random.default_rng(2).random((n, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    w[:, ::7] *= 0.25  # not one magnitude: the scales vary
    raw = quantize(w, name)
    ref = torch.from_numpy(np.asarray(gguf_dequantize(raw, T[name]), np.float64).reshape(n, k))
    gw = GgmlWeight.of(T[name].value, (n, k), raw)
    scale = torch.tensor([[1.0], [-1.0], [3.0]]).repeat(rows // 3, 1)
    x = torch.sign(ref[:1]).float().repeat(rows, 1) * scale  # every |x| = max
    xq, f = cpu_ggml.quantize_x(x)
    assert (xq.abs() == 16383).all()
    xhat = xq.double() * f[:rows * 2].view(rows, 2).double().repeat_interleave(256, 1)
    got = cpu_ggml.linear(x, GgmlLinear(n, ((0, gw),)), None, mode="int16").double()
    torch.testing.assert_close(got, xhat @ ref.T, rtol=1e-5, atol=1e-3)
    # x row 0 has w row 0's signs: every product adds, and a wrapped int32 sum would not
    torch.testing.assert_close(got[0, 0], ref[0].abs().sum(), rtol=1e-5, atol=0)


@needs_native
@pytest.mark.parametrize(("name", "rows", "gemm"), [
    *((n, r, None) for n in K_QUANTS for r in [1, 2, 3, 8]),
    *((n, r, kernel) for kernel, n in GEMM_KERNELS for r in [5, 9])])
def test_int8_activations_stay_exact_in_integers_at_their_extremes(name: str, rows: int, gemm: str | None) -> None:
    """The int8 kernels (native/ggml_q8.cpp for decode steps; ggml_gemm_q8.cpp, ggml_gemm_k8.cpp)
    at their extremes: every |x| its block's max (codes +-127) against the largest codes (Q6_K:
    63 with its offset of 32 taken off through the column sums; Q8_0: 255 after its +128):
    equal to float64 of the rounded activations, so no u8 x s8 pair or int16 run of them
    saturated and no int32 lane wrapped."""
    from agentspeed.kernels import cpu_ggml

    n, k = 16, 512
    w = np.where(np.random.default_rng(2).random((n, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    w[:, ::7] *= 0.25
    w[3] = 1.0  # a row of only the largest positive code
    raw = quantize(w, name)
    ref = torch.from_numpy(np.asarray(gguf_dequantize(raw, T[name]), np.float64).reshape(n, k))
    gw = GgmlWeight.of(T[name].value, (n, k), raw)
    scale = torch.tensor([[1.0], [-1.0], [3.0]]).repeat(3, 1)[:rows]
    x = torch.where(ref[:1] < 0, -1.0, 1.0).float().repeat(rows, 1) * scale
    xq, dx = cpu_ggml.quantize_q8(x)
    assert (xq.abs() == 127).all()
    xhat = xq.double() * dx.double().repeat_interleave(256, 1)
    lin = GgmlLinear(n, ((0, gw),))
    got = (cpu_ggml.gemm_q8(x, lin, kernel=gemm) if gemm else cpu_ggml.linear(x, lin, None)).double()
    torch.testing.assert_close(got, xhat @ ref.T, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[0, 0], ref[0].abs().sum(), rtol=1e-5, atol=0)


@needs_native
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_and_rows_equal_the_gguf_decoder(name: str) -> None:
    from agentspeed.kernels import cpu_ggml

    w, ref = packed(name, 20, 256)
    torch.testing.assert_close(cpu_ggml.dequantize(w).double(), ref, rtol=1e-6, atol=1e-7)
    ids = torch.tensor([[3, 0], [19, -1]])
    rows = cpu_ggml.get_rows(w, ids).double()
    torch.testing.assert_close(rows[0, 0], ref[3], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rows[1, 0], ref[19], rtol=1e-6, atol=1e-7)
    assert rows.shape == (2, 2, 256) and not rows[1, 1].any()  # outside the shard: zeros
    torch.testing.assert_close(w.dequantize().double(), ref, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "F16"])
def test_views_stay_packed_and_mixed_parts_land_side_by_side(name: str) -> None:
    """Row and block-aligned column slices (tensor-parallel shards) are views of the packed
    bytes; a merged projection's parts may be of different types; uncovered rows are zero."""
    w, ref = packed(name, 40, 768)
    col = w.cols(256, 768)
    nbytes = NATIVE_TYPES[w.qtype][2]
    assert col.data.data_ptr() == w.data.data_ptr() + 256 // w.block * nbytes  # a view, not a copy
    other, other_ref = packed("Q5_0", 24, 512, seed=3)
    lin = GgmlLinear(70, ((0, col.rows(4, 30)), (30, other)))
    assert not lin.covered
    want = torch.zeros(5, 70, dtype=torch.float64)
    x = torch.randn(5, 512)
    want[:, :26] = x.double() @ ref[4:30, 256:].T
    want[:, 30:54] = x.double() @ other_ref.T
    torch.testing.assert_close(cpu_native.linear(x, lin, None, mode="exact").double(), want, rtol=1e-5, atol=1e-5)
    err = (cpu_native.linear(x, lin, None).double() - want).abs()  # int16 activations (one rounding for both)
    assert (err[:, :26] <= bound(x, ref[4:30, 256:]) + i16_bound(x, ref[4:30, 256:]) + 1e-6).all()
    assert (err[:, 30:54] <= bound(x, other_ref) + i16_bound(x, other_ref) + 1e-6).all()
    assert not err[:, 26:30].any() and not err[:, 54:].any()
    with pytest.raises(ValueError, match="multiples of"):
        w.cols(100, 768)


# Builds of the ggml kernels alone, beside the default one: CI machines may be AVX2-only or
# AVX-512, so each checks the others' code paths too. AGENTSPEED_FORCE_W16 gives the AVX-512
# build's 16-lane indexing without AVX-512 (split vectors, portable loads).
GGML_SOURCES = ("ggml_linear.cpp", "ggml_i16.cpp", "ggml_gemm_i16.cpp", "ggml_q8.cpp", "ggml_gemm_q8.cpp", "ggml_gemm_k8.cpp")


def compile_all(sources: tuple[str, ...], flags: list[str], out: Path) -> None:
    """Each source to out/<stem>.o, the compilers running side by side."""
    import subprocess

    from agentspeed.kernels import native

    here = Path(native.__file__).parent
    procs = [subprocess.Popen([native._compiler(), *flags, "-c", str(here / f), "-o", str(out / f"{Path(f).stem}.o")],
                              stderr=subprocess.PIPE) for f in sources]
    for p, f in zip(procs, sources):
        _, err = p.communicate()
        assert p.returncode == 0, f"{f}: {err.decode()[-2000:]}"



BUILDS = {"avx2": ["-mno-avx512f"], "16-lane": ["-mno-avx512f", "-DAGENTSPEED_FORCE_W16"],
          "portable": ["-march=x86-64-v2"]}


@needs_native
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_other_builds_of_ggml_kernels(build: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import subprocess

    from agentspeed.kernels import cpu_ggml, native

    lib_path = tmp_path / "libggml_test.so"
    # The 16-lane indexing is ggml_linear.cpp's only (the int16 kernels use fixed 256-bit
    # vectors); the other builds take all three, compiled side by side.
    sources = GGML_SOURCES[:1] if build == "16-lane" else GGML_SOURCES
    compile_all(sources, [*native.FLAGS, *BUILDS[build]], tmp_path)
    subprocess.run([native._compiler(), *native.LINK_FLAGS, *(str(tmp_path / f"{Path(f).stem}.o") for f in sources),
                    "-o", str(lib_path)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    symbols = {"_gemv": "ggml_gemv", "_gemm": "ggml_gemm", "_dequant": "ggml_dequant",
               "_quantize": "ggml_quantize_x", "_linear_i16": "ggml_linear_i16", "_gemm_i16": "ggml_gemm_i16",
               "_linear_q8": "ggml_linear_q8", "_gemm_q8": "ggml_gemm_q8", "_gemm_k8": "ggml_gemm_k8"}
    for attr, sym in list(symbols.items())[:3 if build == "16-lane" else None]:
        f = getattr(lib, sym)
        f.argtypes, f.restype = getattr(cpu_ggml, attr).argtypes, cpu_ggml._I
        monkeypatch.setattr(cpu_ggml, attr, f)
    for name in TYPES:
        w, ref = packed(name, 33, 512)
        for rows, mode in ((1, "auto"), (2, "auto"), (7, "auto"), (9, "auto"), (9, "int16"), (130, "int16")):
            x = torch.randn(rows, 512)
            limit = bound(x, ref) + rounding_bound(name, rows, mode, x, ref) + 1e-6
            got = cpu_ggml.linear(x, GgmlLinear(33, ((0, w),)), None, mode=mode).double()
            assert ((got - x.double() @ ref.T).abs() <= limit).all(), (build, name, rows, mode)
        torch.testing.assert_close(cpu_ggml.dequantize(w).double(), ref, rtol=1e-6, atol=1e-7)
    if build != "16-lane":  # the int8 GEMMs' loops (no VNNI here: ggml_gemm_q8's portable one)
        for kernel, name in GEMM_KERNELS:
            check_gemm_q8(name, 6, kernel=kernel)


@needs_native
@pytest.mark.parametrize("flags", [["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"], ["-mavxvnni"]])
def test_vnni_builds_of_the_int16_kernel_compile(flags: list[str], tmp_path: Path) -> None:
    """The VNNI form of the int16 multiply-add (vpdpwssd) builds; it runs where the CPU has
    it (tests above on such a machine), which this one may not."""
    from agentspeed.kernels import native

    compile_all(GGML_SOURCES[1:], [*native.FLAGS, *flags], tmp_path)

@pytest.fixture(scope="module")
def tiny_k_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models wide enough for 256-weight blocks (every K a multiple of 256)."""
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("tiny_k")
    big = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)
    return {"qwen2": make_tiny("qwen2", root, **big),
            "llama": make_tiny("llama", root, tie_word_embeddings=True, **big)}


@pytest.fixture
def int8_reference_backend(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[int], bool]], str]:
    """A `linear` backend for the test only, made for a rule of which row counts round to
    int8: dense fp32 weights whose inputs of those row counts (and 256-column blocks) are first
    rounded to int8 exactly as the int8 kernels round them (cpu_ggml.quantize_q8), then
    multiplied in float64: the model the int8 kernels compute, without their integer
    arithmetic. Other inputs are multiplied unrounded (the int16 rounding is below fp32's
    tolerance here)."""
    from agentspeed.kernels import registry

    rule: list[Callable[[int], bool]] = []

    def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from agentspeed.kernels import cpu_ggml

        k = x.shape[-1]
        x2 = x.reshape(-1, k).float().contiguous()
        if rule[0](x2.shape[0]) and k % 256 == 0:
            xq, dx = cpu_ggml.quantize_q8(x2)
            x2 = (xq.double() * dx.double().repeat_interleave(256, 1)).float()
        y = (x2.double() @ w.double().T).float()
        return (y if bias is None else y + bias).view(*x.shape[:-1], w.shape[0])

    impls = dict(registry._REGISTRY["linear"])
    monkeypatch.setitem(registry._REGISTRY, "linear", impls)
    registry.register_kernel("linear", "test_int8_reference", ("cpu",), (torch.float32,), priority=-100)(linear)

    def backend(rows: Callable[[int], bool]) -> str:
        rule[:] = [rows]
        return "test_int8_reference"

    return backend


def teacher_forced(a: object, b: object, prompts: list[list[int]], tokens: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Both runners' logits ([len(prompts), vocab] each) at every step of a greedy run that
    emits `tokens`, batched as generate() batches it: every prompt in one prefill, then one
    decode step of all of them per token."""
    from agentspeed.control.plan import ScheduledChunk

    pages = [list(range(1 + 4 * i, 5 + 4 * i)) for i in range(len(prompts))]
    steps = [[ScheduledChunk(f"s{i}", p, 0, pages[i]) for i, p in enumerate(prompts)]]
    for j in range(len(tokens[0]) - 1):
        steps.append([ScheduledChunk(f"s{i}", [tokens[i][j]], len(p) + j, pages[i]) for i, p in enumerate(prompts)])
    return [(a.forward(c).float(), b.forward(c).float()) for c in steps]  # type: ignore[attr-defined]


@needs_native
@pytest.mark.parametrize("name", TYPES)
def test_tiny_model_in_each_type_equals_its_dense_fp32_path(
        name: str, tiny_k_models: dict[str, Path], tmp_path: Path,
        int8_reference_backend: Callable[[Callable[[int], bool]], str]) -> None:
    """Greedy tokens of a tiny model stored in `name`: packed (default kernels) equal the
    same file dequantized by the gguf package and run dense with the same activation rounding:
    fp32 (`linear=cpu`) where every step rounds to int16 or keeps fp32, else int8-rounded
    inputs where the int8 kernels read them (int8_rows: Q4_K, Q5_K, Q6_K in decode steps, and
    in prefill on a VNNI build; the rounding, llama.cpp's, flips
    near-tied greedy tokens of this random model against fp32, so fp32 is not their
    reference). Logits equal fp32 with fp32 activations (cpu_native_exact), and are within the
    activations' rounding with the default ones and with int16 activations throughout
    (cpu_native_int16, prefill included)."""
    from test_hf_parity import PROMPTS, runner_for

    from agentspeed.config import KernelConfig
    from agentspeed.control.plan import ScheduledChunk
    from agentspeed.engine.simple_generate import generate
    from agentspeed.kernels import cpu_ggml
    from agentspeed.sampling_params import SamplingParams

    arch = "llama" if name in ("Q4_K", "Q8_0", "Q6_K") else "qwen2"  # llama: tied head, permuted q/k
    path = write_gguf(tiny_k_models[arch], tmp_path / f"tiny-{name}.gguf", name, arch)
    int8 = int8_rows(name)
    packed_runner = runner_for(path)
    dense_runner = runner_for(path, kernels=KernelConfig.parse("linear=cpu"))
    ref_runner = dense_runner
    if int8(1) or int8(cpu_ggml.I16_ROWS + 1):
        ref_runner = runner_for(path, kernels=KernelConfig.parse(f"linear={int8_reference_backend(int8)}"))
    assert packed_runner.kernels.widened == {}
    # 2 layers x (qkv, o, gate|up, down), the embedding, and an untied head
    assert sum(n for n, _ in dense_runner.kernels.widened.values()) == 2 * 4 + 1 + (arch == "qwen2")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ours = generate(packed_runner, PROMPTS, params)
    ref = generate(ref_runner, PROMPTS, params)
    if not int8(cpu_ggml.I16_ROWS + 1):
        assert [o.token_ids for o in ours] == [r.token_ids for r in ref]
    else:
        # Prefill rounds to int8 as well, which is discontinuous (see below): a prompt's KV,
        # and every later logit of it, can move by a few percent of the logits' spread, so
        # greedy tokens may part at a near-tie (measured on an AVX-512 Xeon: Q6_K's third
        # prompt, top two 0.034 apart, logits 0.064 apart). Teacher-forced on the reference's
        # tokens, as generate() batches them: each step's choice agrees wherever the reference's
        # top two are further apart than the two paths' logits, and nearly always.
        steps = teacher_forced(packed_runner, ref_runner, PROMPTS, [r.token_ids for r in ref])
        agree = 0
        for got, want in steps:
            gap = (got - want).abs().amax(-1)
            top = want.topk(2, dim=-1).values
            same = got.argmax(-1) == want.argmax(-1)
            assert (same | (top[:, 0] - top[:, 1] < 2 * gap)).all()
            assert (gap < 0.1 * want.std()).all()
            agree += int(same.sum())
        assert agree >= 0.9 * len(steps) * len(PROMPTS)
    assert len({t for o in ours for t in o.token_ids}) > 3  # not a degenerate constant output
    exact_runner = runner_for(path, kernels=KernelConfig.parse("linear=cpu_native_exact"))
    assert exact_runner.kernels.backends["linear"] == "cpu_native_exact" and exact_runner.kernels.widened == {}
    int16_runner = runner_for(path, kernels=KernelConfig.parse("linear=cpu_native_int16"))
    assert int16_runner.kernels.backends["linear"] == "cpu_native_int16" and int16_runner.kernels.widened == {}
    for prompt in [*PROMPTS, PROMPTS[0][:3]]:  # a 3-token prompt: a prefill of decode size
        pages = list(range(1, 1 + -(-len(prompt) // 16)))
        chunk = [ScheduledChunk("x", prompt, 0, pages)]
        want = dense_runner.forward(chunk)
        torch.testing.assert_close(exact_runner.forward(chunk), want, rtol=1e-4, atol=1e-4)
        assert (int16_runner.forward(chunk) - want).abs().max() < 1e-2 * want.std()
        got, ref = packed_runner.forward(chunk), ref_runner.forward(chunk)
        if len(prompt) > cpu_ggml.I16_ROWS and int8(len(prompt)):
            # Rounding a whole prompt to int8 is discontinuous: inputs 1e-7 apart (the
            # reference's fp32 sums against the kernels') flip some codes, and through the
            # layers of this random model that moves the logits by about the rounding's own
            # effect (measured). So: no further from fp32 than the int8 model, and nearer to it
            # than it is to fp32 on average.
            assert (got - want).abs().max() < 2 * (ref - want).abs().max()
            assert (got - ref).abs().mean() < (ref - want).abs().mean()
        else:
            assert (got - ref).abs().max() < 1e-2 * want.std()
        if int8(len(prompt)):  # the rounding shows: int8's error against fp32 is far above int16's
            assert (got - want).abs().max() > 10 * (int16_runner.forward(chunk) - want).abs().max()


@needs_native
def test_a_type_without_a_kernel_is_named_and_widened(
        tiny_k_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """IQ4_NL embeddings (no native kernel): the load log names the type and its cost, the
    tensor is dequantized to fp32 (by the gguf package), and the rest stays packed."""
    import logging

    from test_hf_parity import PROMPTS, runner_for

    from agentspeed.engine.simple_generate import generate
    from agentspeed.kernels.ggml import GgmlLinear
    from agentspeed.sampling_params import SamplingParams

    path = write_gguf(tiny_k_models["qwen2"], tmp_path / "tiny-iq4.gguf", "Q4_K", "qwen2", embed_iq4_nl=True)
    with caplog.at_level(logging.WARNING):
        runner = runner_for(path)
    assert "1 IQ4_NL tensors have no native kernel: dequantized to fp32" in caplog.text
    assert sum(isinstance(getattr(m, "_w", None), GgmlLinear) for m in runner.model.modules()) == 2 * 4 + 1
    out = generate(runner, PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 4


def test_llama31_gguf_rope_freqs_match_transformers(tmp_path: Path) -> None:
    """A Llama 3.1-style GGUF (its llama3 rope scaling stored as rope_freqs, one divisor per
    frequency, as llama.cpp's converter writes it) equals transformers with the llama3 rope;
    the factors matter at these positions (dropping them changes the logits)."""
    from conftest import make_tiny
    from test_hf_parity import PROMPTS, hf_greedy, runner_for

    from agentspeed.control.plan import ScheduledChunk
    from agentspeed.engine.simple_generate import generate
    from agentspeed.modeling.loaders.gguf_loader import gguf_model_config, open_gguf
    from agentspeed.sampling_params import SamplingParams

    # original context 64: of the 8 frequencies of head_dim 16, 3 are kept, 1 smoothed, 4 divided
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = make_tiny("llama", tmp_path, rope_parameters=rope)
    path = write_gguf(hf, tmp_path / "llama31.gguf", "F32", "llama")
    cfg = gguf_model_config(open_gguf(path))
    assert cfg.rope_freq_factors is not None and len(cfg.rope_freq_factors) == 8
    assert cfg.rope_freq_factors[0] == 1.0 and cfg.rope_freq_factors[-1] == 8.0
    runner = runner_for(path, page_size=7)
    prompt = PROMPTS[1]
    ref_tokens, ref_logits = hf_greedy(hf, prompt, 16)
    out = generate(runner, [prompt], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert out[0].token_ids == ref_tokens
    full = prompt + ref_tokens
    chunk = ScheduledChunk("x", full[:-1], 0, list(range(1, 1 + -(-len(full) // 7))))
    logits = runner.forward([chunk])
    torch.testing.assert_close(logits[0], ref_logits[-1], rtol=1e-4, atol=1e-4)
    plain = runner.model.cos_sin.clone()
    from agentspeed.modeling.layers.rotary import cos_sin_table

    runner.model.cos_sin.copy_(cos_sin_table(16, cfg.max_position_embeddings, cfg.rope_theta, None, "cpu"))
    assert not torch.allclose(runner.forward([chunk])[0], logits[0], rtol=1e-3, atol=1e-3)
    runner.model.cos_sin.copy_(plain)
