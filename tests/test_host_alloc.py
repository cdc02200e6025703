"""The caching host allocator (execution/host_alloc.py): big CPU tensors come from blocks
that are reused, contents are never shared between live tensors, the cache stays bounded,
and a machine that cannot build it keeps glibc with a warning."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from agentspeed.config import EngineConfig
from agentspeed.errors import ConfigError
from agentspeed.execution import host_alloc
from agentspeed.kernels.native import NativeBuildError

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not host_alloc.install(), reason="the caching host allocator cannot be built here")


@pytest.fixture(autouse=True)
def _empty() -> None:
    host_alloc.empty_cache()  # each test starts from an empty cache


def test_a_freed_block_serves_the_next_request_of_about_its_size() -> None:
    x = torch.empty(3 * MiB, dtype=torch.uint8)
    ptr = x.data_ptr()
    del x
    s0 = host_alloc.stats()
    assert s0.cached >= 3 * MiB
    y = torch.empty(int(2.5 * MiB), dtype=torch.uint8)
    assert y.data_ptr() == ptr
    assert host_alloc.stats().hits == s0.hits + 1
    small = torch.empty(100_000, dtype=torch.uint8)  # below the block size: glibc's, not counted
    assert host_alloc.stats().hits == s0.hits + 1 and host_alloc.stats().misses == s0.misses
    del small


def test_a_block_is_not_used_for_a_much_smaller_or_a_bigger_request() -> None:
    x = torch.empty(32 * MiB, dtype=torch.uint8)
    ptr = x.data_ptr()
    del x
    y = torch.empty(2 * MiB, dtype=torch.uint8)  # 32 MiB > 8 x 2 MiB: a block of its own
    z = torch.empty(40 * MiB, dtype=torch.uint8)  # too big for the cached block
    assert ptr not in (y.data_ptr(), z.data_ptr())
    assert host_alloc.stats().cached >= 32 * MiB


def test_a_repeating_pattern_maps_nothing_after_its_first_round() -> None:
    """A prefill's layers allocate the same sizes over and over: after the first layer every
    request is a hit, and the mapped bytes stop growing."""
    sizes = [13 * MiB, 17 * MiB, 37 * MiB, 18 * MiB, 3 * MiB]

    def layer() -> float:
        x = torch.ones(sizes[0] // 4)
        outs = []
        for n in sizes[1:]:
            t = torch.empty(n // 4)
            t.fill_(1.0)
            outs.append(t)
            if len(outs) == 2:
                outs.pop(0)
        return float(x[0])

    layer()
    s1 = host_alloc.stats()
    for _ in range(10):
        layer()
    s2 = host_alloc.stats()
    assert s2.misses == s1.misses and s2.mapped == s1.mapped
    assert s2.hits >= s1.hits + 10 * len(sizes)


def test_storage_kept_alive_by_numpy_is_not_handed_out_again() -> None:
    t = torch.arange(2 * MiB, dtype=torch.float32)
    a = t.numpy()
    del t
    u = torch.zeros(2 * MiB, dtype=torch.float32)
    assert a[12345] == 12345.0 and float(u.sum()) == 0.0
    assert a.ctypes.data != u.data_ptr()


def test_the_cache_is_bounded() -> None:
    s0 = host_alloc.stats()
    x = torch.empty(host_alloc.CACHE_LIMIT + 64 * MiB, dtype=torch.uint8)
    del x  # more than the cache may hold: unmapped at once
    s1 = host_alloc.stats()
    assert s1.cached <= host_alloc.CACHE_LIMIT
    assert s1.unmapped >= s0.unmapped + host_alloc.CACHE_LIMIT + 64 * MiB
    torch.empty(8 * MiB)
    host_alloc.empty_cache()
    assert host_alloc.stats().cached == 0


def test_threads_never_share_a_live_block() -> None:
    errors: list[str] = []

    def work(k: int) -> None:
        g = torch.Generator().manual_seed(k)
        for i in range(40):
            n = int(torch.randint(MiB // 4, 3 * MiB, (1,), generator=g))
            ts = [torch.full((n,), float(k * 1000 + i + j)) for j in range(3)]
            for j, t in enumerate(ts):
                if not bool((t == float(k * 1000 + i + j)).all()):
                    errors.append(f"thread {k} iteration {i}: block overwritten")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_results_through_the_allocator_match() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(700, 900, generator=g), torch.randn(900, 800, generator=g)
    ref = (a.double() @ b.double()).float()
    for _ in range(3):  # the second and third products land in reused blocks
        torch.testing.assert_close(a @ b, ref, rtol=1e-4, atol=1e-3)


def test_a_machine_that_cannot_build_it_keeps_glibc_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise NativeBuildError("no C++ compiler found")

    monkeypatch.setattr(host_alloc, "_library", fail)
    with caplog.at_level(logging.WARNING, logger="agentspeed.execution.host_alloc"):
        assert host_alloc.install() is False
    assert "no C++ compiler found" in caplog.text


def test_a_failed_build_is_an_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AGENTSPEED_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(NativeBuildError):
        host_alloc._library.__wrapped__()


def test_the_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="host allocator"):
        EngineConfig(host_allocator="jemalloc")
    from agentspeed.cli import build_parser

    args = build_parser().parse_args(["serve", "--host-allocator", "system"])
    from agentspeed.cli import engine_config

    assert engine_config(args).host_allocator == "system"


def _rss_anon() -> int:
    import re
    from pathlib import Path

    return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024  # type: ignore[union-attr]


def test_lazy_zeros_are_zero_and_become_resident_as_written() -> None:
    before = _rss_anon()
    t = host_alloc.lazy_zeros((256, 1024, 256), torch.float16)  # 128 MiB
    assert t.shape == (256, 1024, 256) and t.dtype == torch.float16 and t.is_contiguous()
    assert _rss_anon() - before < 16 * MiB  # nothing touched yet
    t[:32] = 1.0  # 16 MiB written
    grown = _rss_anon() - before
    assert 12 * MiB < grown < 40 * MiB
    assert float(t[32:40].abs().sum()) == 0.0 and float(t[:32].float().mean()) == 1.0


def test_a_cpu_engine_installs_it_and_its_kv_pool_is_lazy(tiny_models: dict[str, object]) -> None:
    from agentspeed.config import CacheConfig
    from agentspeed.execution.model_runner import ModelRunner

    before = _rss_anon()
    runner = ModelRunner(EngineConfig(model=str(tiny_models["llama"]), device="cpu",
                                      cache=CacheConfig(kv_cache_memory=256 * MiB)))
    assert host_alloc.active()
    k = runner.kv.layers[0].k
    assert k.numel() * k.element_size() * 2 * len(runner.kv.layers) > 200 * MiB
    assert _rss_anon() - before < 100 * MiB  # the 256 MiB pool is mapped, not written
    assert float(k[:4].abs().sum()) == 0.0
