"""Per-request timings of a serving bench and their summary, as ``vllm bench serve`` reports.

* TTFT: request sent -> first non-empty text;
* TPOT: (end - first text) / (output tokens - 1), per request;
* ITL: the gap between consecutive text pieces, over all requests;
* E2E: request sent -> last byte of the answer;
* goodput: completed requests per second whose TTFT and TPOT both meet the SLO.
"""

from __future__ import annotations

import math

import msgspec

PERCENTILES = (50, 90, 99)


class Record(msgspec.Struct, kw_only=True):
    """One request as the client saw it (perf_counter seconds)."""

    start: float
    ttft: float = math.nan
    end: float = math.nan
    output_tokens: int = 0
    itl: list[float] = msgspec.field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.output_tokens > 0

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class SLO(msgspec.Struct, frozen=True):
    ttft_ms: float
    tpot_ms: float

    def met(self, r: Record) -> bool:
        tpot = r.tpot
        return r.ttft * 1e3 <= self.ttft_ms and (math.isnan(tpot) or tpot * 1e3 <= self.tpot_ms)


class Summary(msgspec.Struct, kw_only=True):
    system: str
    load: str  # "rate=2.0/s", "burst" or "concurrency=8"
    offered_rate: float | None  # requests/s asked for; None for burst and closed loop
    concurrency: int | None
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests/s
    output_throughput: float  # output tokens/s
    goodput: float  # requests/s meeting the SLO
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _dist_ms(values: list[float]) -> dict[str, float]:
    out = {f"p{q}": round(percentile(values, q) * 1e3, 3) for q in PERCENTILES}
    finite = [v for v in values if not math.isnan(v)]
    out["mean"] = round(sum(finite) / len(finite) * 1e3, 3) if finite else math.nan
    return out


def summarize(system: str, load: str, records: list[Record], t0: float, slo: SLO, *,
              offered_rate: float | None = None, concurrency: int | None = None) -> Summary:
    """``t0``: when the run started sending (the duration runs to the last answer)."""
    done = [r for r in records if r.ok]
    ends = [r.end for r in done]
    duration = (max(ends) - t0) if ends else math.nan
    tokens = sum(r.output_tokens for r in done)
    return Summary(
        system=system, load=load, offered_rate=offered_rate, concurrency=concurrency,
        completed=len(done), failed=len(records) - len(done),
        duration_s=round(duration, 3),
        request_throughput=round(len(done) / duration, 3) if done else 0.0,
        output_throughput=round(tokens / duration, 1) if done else 0.0,
        goodput=round(sum(slo.met(r) for r in done) / duration, 3) if done else 0.0,
        ttft_ms=_dist_ms([r.ttft for r in done]),
        tpot_ms=_dist_ms([r.tpot for r in done]),
        itl_ms=_dist_ms([gap for r in done for gap in r.itl]),
        e2e_ms=_dist_ms([r.e2e for r in done]),
        errors=sorted({r.error for r in records if r.error})[:5],
    )
