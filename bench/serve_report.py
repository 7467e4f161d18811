"""Printing, comparing and plotting the summaries of a serving bench run."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from bench.serve_metrics import Summary


def table(rows: list[Summary]) -> str:
    head = (f"{'system':<14}{'load':<17}{'ok':>5}{'fail':>5}{'req/s':>8}{'tok/s':>8}"
            f"{'good/s':>8}{'TTFT p50/p90/p99 ms':>24}{'TPOT p50/p99':>15}{'ITL p50/p99':>15}"
            f"{'E2E p50/p99 ms':>18}")
    lines = [head]
    for s in rows:
        t, p, i, e = s.ttft_ms, s.tpot_ms, s.itl_ms, s.e2e_ms
        lines.append(
            f"{s.system:<14}{s.load:<17}{s.completed:>5}{s.failed:>5}"
            f"{s.request_throughput:>8.2f}{s.output_throughput:>8.1f}{s.goodput:>8.2f}"
            f"{t['p50']:>10.1f}/{t['p90']:.1f}/{t['p99']:.1f}"
            f"{p['p50']:>9.1f}/{p['p99']:.1f}{i['p50']:>9.1f}/{i['p99']:.1f}"
            f"{e['p50']:>10.0f}/{e['p99']:.0f}")
        lines += [f"    error: {err}" for err in s.errors]
    return "\n".join(lines)


def compare(rows: list[Summary], system: str, base: str) -> list[dict[str, object]]:
    """Per load where both ran: ``system``'s output-throughput ratio and added TTFT p50/p99
    over ``base``."""
    by = {(s.system, s.load): s for s in rows}
    out: list[dict[str, object]] = []
    for s in rows:
        if s.system != system or (b := by.get((base, s.load))) is None:
            continue
        ratio = s.output_throughput / b.output_throughput if b.output_throughput else math.nan
        out.append({
            "load": s.load, "system": system, "base": base,
            "throughput_ratio": round(ratio, 3),
            "request_rate_ratio": round(s.request_throughput / b.request_throughput, 3)
            if b.request_throughput else math.nan,
            "added_ttft_p50_ms": round(s.ttft_ms["p50"] - b.ttft_ms["p50"], 2),
            "added_ttft_p99_ms": round(s.ttft_ms["p99"] - b.ttft_ms["p99"], 2),
        })
    return out


def ratio_lines(ratios: list[dict[str, object]]) -> list[str]:
    return [f"{r['system']} vs {r['base']} at {r['load']}: output tok/s "
            f"{r['throughput_ratio']:.1%}, TTFT p50 {r['added_ttft_p50_ms']:+.1f} ms, "
            f"p99 {r['added_ttft_p99_ms']:+.1f} ms" for r in ratios]


def saturated(s: Summary) -> bool:
    """It completed under 90% of the offered request rate: the queue grows without bound."""
    return s.offered_rate is not None and s.request_throughput < 0.9 * s.offered_rate


def ceiling(rows: list[Summary], system: str) -> dict[str, object] | None:
    """Where ``system`` stops keeping up, two ways: the lowest offered rate from which its p99
    E2E latency stays at least double its p99 at the lightest rate (at every higher rate
    too, so one noisy p99 on a shared machine does not count), with what it achieved there
    and just below; and the lowest rate at which it completes under 90% of the offered
    rate (saturation; the best rate achieved is its capacity)."""
    runs = sorted((s for s in rows if s.system == system and s.offered_rate is not None),
                  key=lambda s: s.offered_rate or 0.0)
    if len(runs) < 2:
        return None
    base = runs[0].e2e_ms["p99"]
    out: dict[str, object] = {
        "system": system, "base_p99_ms": base, "doubled_at_offered_rate": None,
        "saturated_at_offered_rate": next((s.offered_rate for s in runs if saturated(s)), None),
        "max_achieved_req_s": max(s.request_throughput for s in runs),
        "max_achieved_chunks_s": max(s.output_throughput for s in runs)}
    for i, (below, s) in enumerate(itertools.pairwise(runs), start=1):
        if all(later.e2e_ms["p99"] >= 2 * base for later in runs[i:]):
            out |= {"doubled_at_offered_rate": s.offered_rate, "p99_ms": s.e2e_ms["p99"],
                    "achieved_req_s": s.request_throughput,
                    "achieved_chunks_s": s.output_throughput,
                    "last_below": {"offered_rate": below.offered_rate,
                                   "req_s": below.request_throughput,
                                   "chunks_s": below.output_throughput,
                                   "p99_ms": below.e2e_ms["p99"]}}
            break
    return out


def ceiling_line(c: dict[str, object]) -> str:
    doubled = (f"p99 doubled ({c['base_p99_ms']:.0f} -> {c['p99_ms']:.0f} ms) at "
               f"{c['doubled_at_offered_rate']:g} req/s offered: {c['achieved_req_s']:.0f} "
               f"req/s, {c['achieved_chunks_s']:.0f} chunks/s achieved"
               if c["doubled_at_offered_rate"] else "p99 never doubled")
    sat = (f"saturated (< 90% of offered) at {c['saturated_at_offered_rate']:g} req/s"
           if c["saturated_at_offered_rate"] else "never saturated: sweep higher (--rates)")
    return (f"ceiling of {c['system']}: {doubled}; {sat}; best achieved "
            f"{c['max_achieved_req_s']:.0f} req/s, {c['max_achieved_chunks_s']:.0f} chunks/s")


def plot(rows: list[Summary], path: Path, title: str, closed_loop: bool) -> Path:
    """Latency percentiles vs load, one line per system (burst runs are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def x_of(s: Summary) -> float | None:
        if closed_loop:
            return None if s.concurrency is None else float(s.concurrency)
        return s.offered_rate

    panels = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E latency"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    systems = list(dict.fromkeys(s.system for s in rows))
    colors = {name: f"C{i}" for i, name in enumerate(systems)}  # one colour per system
    for ax, (field, label) in zip(axes, panels, strict=True):
        for system in systems:
            pts = sorted((x, getattr(s, field)) for s in rows
                         if s.system == system and (x := x_of(s)) is not None)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            for q, style in (("p50", "-o"), ("p99", "--^")):
                ax.plot(xs, [d[q] for _, d in pts], style, color=colors[system],
                        label=f"{system} {q}")
        ax.set_xlabel("concurrent requests" if closed_loop else "offered rate (requests/s)")
        ax.set_ylabel(f"{label} (ms)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        if not closed_loop:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({x for s in rows if (x := x_of(s)) is not None})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
