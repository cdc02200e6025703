"""The many-row integer linear (kernels/native/i16_gemm.cpp): x rounded per block of 32 to
16 bits against a GGUF Q4_1 / Q8_0 weight's exact codes. Its error stays inside the bound
that rounding implies, through the library on any CPU (the portable loop where there is no
AVX512-VNNI, also built and checked on VNNI machines), the default CPU linear takes it above
8 rows only where the fast path exists, and SmolLM2's greedy tokens match the fp32 linears'."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from test_cpu_native import needs_native, q4_weight
from test_cpu_native import q8_weight as _q8_weight

from agentspeed.kernels import cpu_native, native

HAS_AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text()


def _bind(lib: ctypes.CDLL) -> ctypes._CFuncPtr:
    fn = lib.i16_gemm
    fn.argtypes = cpu_native._I16_ARGTYPES
    fn.restype = cpu_native._I
    return fn


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ctypes._CFuncPtr]:
    """The library's i16_gemm as built here, and on AVX-512 machines also the AVX2 build
    (which has the portable loop), so both arithmetic paths are checked on one machine."""
    out = {"native": _bind(native.load())}
    if HAS_AVX512:
        mp = pytest.MonkeyPatch()
        mp.setenv("AGENTSPEED_CACHE_DIR", str(tmp_path_factory.mktemp("avx2")))
        mp.setenv("AGENTSPEED_NATIVE_FLAGS", "-mno-avx512f")
        lib = native.load.__wrapped__()
        mp.undo()
        assert lib.i16_gemm_fast() == 0
        out["avx2"] = _bind(lib)
    return out


def _weight(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor | None]]:
    w = q4_weight(n, k, seed) if fmt == "q4" else _q8_weight(n, k, seed)
    if fmt == "q4":
        codes, scales, mins = cpu_native.to_q4(w)  # type: ignore[misc]
        return w, cpu_native.to_wide(cpu_native._unpack_q4(codes), scales, mins)
    codes8, scales8 = cpu_native.to_q8(w)  # type: ignore[misc]
    return w, cpu_native.to_wide(codes8, scales8, None)


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|error| allowed per output: each x rounds by at most its block's max / 65534, times
    |w| summed over the block, plus fp32 rounding of the float sums."""
    r, k = x.shape
    amax = x.abs().reshape(r, k // 32, 32).amax(-1).double() / 65534  # [r, blocks]
    wabs = w.abs().double().reshape(w.shape[0], k // 32, 32).sum(-1)  # [n, blocks]
    return (amax @ wabs.T) * 1.001 + 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-6


@needs_native
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("rows", [1, 5, 9, 40, 131])
@pytest.mark.parametrize("bias", [True, False])
def test_within_the_rounding_bound(kernels: dict[str, ctypes._CFuncPtr], fmt: str, rows: int, bias: bool) -> None:
    n, k = 203, 640  # n not a multiple of 16 or of the 48-column tile; 20 blocks of 32
    w, (codes, scales, mins) = _weight(fmt, n, k, seed=rows)
    x = torch.randn(rows, k) * torch.logspace(-3, 1, k)  # blocks of very different sizes
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    b = torch.randn(n) if bias else None
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    for name, fn in kernels.items():
        y = torch.full((rows, n), float("nan"))
        rc = fn(x.data_ptr(), rows, k, codes.data_ptr(), scales.data_ptr(), cpu_native._ptr(mins),
                cpu_native._ptr(b), y.data_ptr(), n, 2)
        assert rc == 0
        err = (y.double() - want).abs()
        assert bool((err <= _bound(x, w)).all()), f"{name}: worst excess {(err - _bound(x, w)).max().item():.3e}"
        # and not trivially: the rounding is there but far below bf16's (2^-9 relative)
        assert err.max().item() < 1e-3 * want.abs().max().item()


@needs_native
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_nan_rows_not_numbers(kernels: dict[str, ctypes._CFuncPtr], fmt: str,
                                                     bad: float) -> None:
    n, k, rows = 40, 64, 12
    _, (codes, scales, mins) = _weight(fmt, n, k, seed=1)
    x = torch.randn(rows, k)
    x[3, 40] = bad
    for name, fn in kernels.items():
        y = torch.zeros(rows, n)
        assert fn(x.data_ptr(), rows, k, codes.data_ptr(), scales.data_ptr(), cpu_native._ptr(mins), None,
                  y.data_ptr(), n, 2) == 0
        assert bool(y[3].isnan().all()), name
        assert bool(y[torch.arange(rows) != 3].isfinite().all()), name


@needs_native
def test_refuses_what_it_cannot_take(kernels: dict[str, ctypes._CFuncPtr]) -> None:
    y = torch.empty(4, 16)
    x = torch.randn(4, 48)
    for fn in kernels.values():
        assert fn(x.data_ptr(), 4, 48, None, None, None, None, y.data_ptr(), 16, 1) == -1  # K % 32
        assert fn(x.data_ptr(), 0, 32, None, None, None, None, y.data_ptr(), 16, 1) == -1  # no rows


@needs_native
@pytest.mark.parametrize("prepare", ["_prepare_linear", "_prepare_linear_fp32"])
def test_default_linear_routes_many_rows_here_only_with_the_fast_path(prepare: str) -> None:
    w, b = q4_weight(150, 256, seed=3), torch.randn(150)
    p = getattr(cpu_native, prepare)(w)
    fast = cpu_native._i16 is not None
    assert (p.wide is not None) == (fast and prepare == "_prepare_linear")
    for rows in (0, 3, 9, 64):
        x = torch.randn(rows, 256)
        y = cpu_native.linear(x, p, b)
        assert y.shape == (rows, 150)
        want = x.double() @ w.double().T + b.double()
        if p.wide is not None and rows > cpu_native.Q4_MAX_ROWS:
            assert bool(((y.double() - want).abs() <= _bound(x, w)).all())
        else:  # the fp32 product up to summation order
            torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.skipif(cpu_native._i16 is None, reason="no AVX512-VNNI: the default linear is fp32 at every size here")
def test_smollm2_greedy_tokens_match_the_fp32_linears(smollm2_path: Path) -> None:
    """Prefill (hundreds of rows) and batched decodes with drafts (> 8 rows) go through the
    16-bit path by default; the tokens must be the ones the fp32 linears give."""
    from agentspeed.engine.llm import LLM
    from agentspeed.sampling_params import SamplingParams

    text = ("def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0) if a[0] < b[0] "
            "else b.pop(0))\n    return out + a + b\n\n")
    prompts = [f"# file {i}\n" + text * (4 + i) + "Explain what merge does." for i in range(4)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    got = {}
    for backend in (None, "linear=cpu_native_fp32"):
        llm = LLM(str(smollm2_path), kernel_backend=backend, kv_cache_memory=256 << 20, max_num_batched_tokens=256)
        got[backend] = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
        del llm
    assert got[None] == got["linear=cpu_native_fp32"]


def test_prompt_longer_than_the_step_budget(smollm2_path: Path) -> None:
    """A step of prompt chunks that all stop short of their prompt's end asks the LM head for
    no rows; the block-form linears must return an empty result, not fail."""
    from agentspeed.engine.llm import LLM
    from agentspeed.sampling_params import SamplingParams

    llm = LLM(str(smollm2_path), kv_cache_memory=64 << 20, max_num_batched_tokens=64)
    out = llm.generate({"prompt_token_ids": list(range(100, 300))}, SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 3
