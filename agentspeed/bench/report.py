"""Figures of one replay level, the rich table, and the Pareto plot.

Per concurrency level:
  per-user decode tok/s   per request: (completion tokens - 1) / (last chunk - first chunk);
                          p50 and p10 over requests (p10: the slow users)
  TTFT p50 / p99          client-side, send to first content chunk
  eligible hit rate       cached tokens / tokens that were in the previous turn's prompt +
                          answer (the most a prefix cache can reuse); for recorded
                          conversations, which re-send the recorded answer rather than the
                          generated one, the previous prompt only
  completion tok/s        completion tokens / wall time
  useful tok/s            (uncached prompt tokens + completion tokens) / wall time: the
                          tokens computed (a prefix miss adds to it)
  served tok/s            (prompt tokens + completion tokens) / wall time: the tokens the
                          sessions sent and got back, cached or not (a fixed workload's
                          rate of service, whatever its hit rate)
  tok/min per device      useful tok/s x 60 / devices
  TTFAT p50               per session: session start to the first token of its final answer
  per replica             behind a gateway that names the worker (SMG): requests and eligible
                          hit rate of each replica
"""

from __future__ import annotations

import statistics
from typing import Any

from agentspeed.bench.client import RequestRecord
from agentspeed.bench.runner import SessionRecord


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(label: str, concurrency: int, sessions: list[SessionRecord], wall: float, devices: int) -> dict[str, Any]:
    reqs = [r for s in sessions for r in s.requests]
    ok = [r for r in reqs if r.error is None]
    decode = [x for r in ok if (x := r.decode_tok_s) is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    eligible = sum(r.eligible_tokens for r in ok)
    completion = sum(r.completion_tokens for r in ok)
    useful = (prompt - cached + completion) / wall if wall > 0 else 0.0
    ttfat = []
    for s in sessions:
        last = s.requests[-1] if s.requests else None
        if last is not None and last.error is None and last.ttft is not None:
            ttfat.append(last.start + last.ttft - s.start)
    return {
        "endpoint": label, "concurrency": concurrency, "sessions": len(sessions), "requests": len(reqs),
        "errors": len(reqs) - len(ok), "wall_s": wall,
        "per_user_decode_tok_s_p50": _pct(decode, 50), "per_user_decode_tok_s_p10": _pct(decode, 10),
        "ttft_s_p50": _pct(ttft, 50), "ttft_s_p99": _pct(ttft, 99),
        "ttfat_s_p50": statistics.median(ttfat) if ttfat else None,
        "prompt_tokens": prompt, "cached_tokens": cached, "eligible_tokens": eligible,
        "completion_tokens": completion,
        "eligible_hit_rate": cached / eligible if eligible else None,
        "completion_tok_s": completion / wall if wall > 0 else 0.0,
        "useful_tok_s": useful, "tok_min_per_device": useful * 60 / devices,
        "served_tok_s": (prompt + completion) / wall if wall > 0 else 0.0,
        "first_errors": [r.error for r in reqs if r.error][:3],
        "per_replica": _per_replica(ok),
    }


def _per_replica(reqs: list[RequestRecord]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for w in sorted({r.worker for r in reqs if r.worker}):
        mine = [r for r in reqs if r.worker == w]
        eligible = sum(r.eligible_tokens for r in mine)
        cached = sum(r.cached_tokens for r in mine)
        out[w] = {"requests": len(mine), "cached_tokens": cached, "eligible_tokens": eligible,
                  "eligible_hit_rate": cached / eligible if eligible else None}
    return out


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="agentic replay (closed loop)")
    for col in ("endpoint", "C", "user tok/s p50", "p10", "TTFT p50 ms", "p99 ms", "TTFAT p50 s", "hit rate",
                "compl tok/s", "useful tok/s", "tok/min/dev", "errors"):
        t.add_column(col, justify="left" if col == "endpoint" else "right")
    for r in rows:
        t.add_row(r["endpoint"], str(r["concurrency"]), _f(r["per_user_decode_tok_s_p50"], ".1f"),
                  _f(r["per_user_decode_tok_s_p10"], ".1f"),
                  _f(r["ttft_s_p50"] and r["ttft_s_p50"] * 1000, ".0f"),
                  _f(r["ttft_s_p99"] and r["ttft_s_p99"] * 1000, ".0f"), _f(r["ttfat_s_p50"], ".1f"),
                  _f(r["eligible_hit_rate"] and r["eligible_hit_rate"] * 100, ".1f") + "%",
                  _f(r["completion_tok_s"], ".1f"), _f(r["useful_tok_s"], ".1f"), _f(r["tok_min_per_device"], ".0f"),
                  str(r["errors"]))
    Console(width=max(160, Console().width)).print(t)


def plot_pareto(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Per-user decode tok/s (x) against tokens/min per device (y), one curve per endpoint,
    points labelled with their concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label in dict.fromkeys(r["endpoint"] for r in rows):
        pts = sorted((r for r in rows if r["endpoint"] == label and r["per_user_decode_tok_s_p50"]),
                     key=lambda r: r["concurrency"])
        xs = [r["per_user_decode_tok_s_p50"] for r in pts]
        ys = [r["tok_min_per_device"] for r in pts]
        ax.plot(xs, ys, marker="o", label=label)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(f"C={r['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("per-user decode tokens/s (p50)")
    ax.set_ylabel("useful tokens/min per device")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
