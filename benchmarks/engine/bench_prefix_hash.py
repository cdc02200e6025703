"""Cost of prefix-cache keys (SHA-256 chain over full pages, control/prefix_cache.py) per
page, against the Python hash() key it replaced, and per admitted 32K-token prompt.

    python benchmarks/engine/bench_prefix_hash.py [--page-size 16] [--tokens 32768]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

from agentspeed.control.prefix_cache import extend_hashes


def _old(hashes: list[int], tokens: Sequence[int], ps: int, extra: object = None) -> None:
    for i in range(len(hashes), len(tokens) // ps):
        hashes.append(hash((hashes[-1] if hashes else None, tuple(tokens[i * ps : (i + 1) * ps]), extra)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    rng = random.Random(0)
    toks = [rng.randrange(0, 49152) for _ in range(a.tokens)]
    pages = a.tokens // a.page_size
    best = {}
    for name, fn in (("sha256", lambda: extend_hashes([], toks, a.page_size, "salt")),
                     ("python hash (old)", lambda: _old([], toks, a.page_size, "salt"))):
        ts = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        best[name] = min(ts)
    print(f"command: python benchmarks/engine/bench_prefix_hash.py --page-size {a.page_size} --tokens {a.tokens}")
    for name, t in best.items():
        print(f"{name}: {t * 1e6 / pages:.2f} us per page, {t * 1e3:.2f} ms per {a.tokens}-token prompt")


if __name__ == "__main__":
    main()
