"""The requests a serving bench sends, and when: seeded, so every system gets the same ones.

Prompts come from the shipped set (``bench/data/prompts.jsonl``) and, for a share of the
requests, synthetic prompts of random length (words drawn from a small vocabulary). Each
request's ``max_tokens`` is drawn uniformly from ``[output_len * (1 - range_ratio),
output_len * (1 + range_ratio)]``. Arrivals are a Poisson process at ``rate`` requests/s
(exponential gaps), or all at t=0 for a burst (``rate`` = inf), as ``vllm bench serve`` does.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import msgspec

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "prompts.jsonl"

#: Synthetic prompts are drawn from these words (common, single-token in most vocabularies).
WORDS = ("the", "a", "river", "city", "light", "old", "new", "people", "went", "said", "time",
         "house", "green", "water", "long", "road", "small", "story", "night", "day", "found",
         "wind", "over", "under", "stone", "bright", "quiet", "market", "garden", "letter")


class WorkloadError(ValueError):
    """A workload setting that cannot produce requests (bad range, empty prompt file)."""


class Item(msgspec.Struct, frozen=True):
    index: int
    prompt: str
    max_tokens: int
    arrival: float  # seconds after the run's start (open loop); 0 in a burst


class Shape(msgspec.Struct, frozen=True, kw_only=True):
    """What the requests look like (not when they arrive)."""

    output_len: int = 32
    range_ratio: float = 0.5
    synthetic_fraction: float = 0.5
    synthetic_input_len: int = 48  # words, drawn with the same range_ratio

    def check(self) -> None:
        if self.output_len < 1:
            raise WorkloadError(f"output_len must be >= 1, got {self.output_len}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise WorkloadError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise WorkloadError(f"synthetic_fraction must be in [0, 1], got "
                                f"{self.synthetic_fraction}")
        if self.synthetic_input_len < 1:
            raise WorkloadError("synthetic_input_len must be >= 1")


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    prompts = [msgspec.json.decode(line)["prompt"] for line in path.read_bytes().splitlines()
               if line.strip()]
    if not prompts:
        raise WorkloadError(f"no prompts in {path}")
    return prompts


def _span(rng: random.Random, mean: int, ratio: float) -> int:
    low, high = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return rng.randint(low, high)


def arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """n arrival offsets: a Poisson process at ``rate``/s starting at 0, or all 0 (burst)."""
    if rate <= 0:
        raise WorkloadError(f"rate must be > 0 (inf for a burst), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def make_items(n: int, rate: float, shape: Shape, seed: int,
               prompts: list[str] | None = None) -> list[Item]:
    """The same (seed, n, rate, shape) gives the same requests at the same offsets."""
    shape.check()
    pool = prompts if prompts is not None else load_prompts()
    rng = random.Random(seed)
    items = []
    for i, at in enumerate(arrivals(n, rate, rng)):
        if rng.random() < shape.synthetic_fraction:
            words = _span(rng, shape.synthetic_input_len, shape.range_ratio)
            prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        else:
            prompt = rng.choice(pool)
        # A distinct request number up front: no system can answer from a prefix cache that
        # another request of the run warmed.
        items.append(Item(i, f"[{seed}-{i}] {prompt}",
                          _span(rng, shape.output_len, shape.range_ratio), at))
    return items
