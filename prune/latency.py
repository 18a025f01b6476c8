"""Latency of a candidate relative to a reference, timed interleaved in one process: a ratio you can believe on a
shared machine.

Absolute milliseconds on a busy host move by 10-30% between two runs of the same model (the unpruned PP-OCRv4 det
measured 75.4 and 73.2 ms, a pruned one 55.6 and 65.6 ms, back to back), so a ratio of two separately taken
medians says little. Here both exported programs are loaded side by side and run in rounds, alternating which
goes first (A B, B A, ...), on the same input with the same threads; each round gives one ratio, and load that
comes and goes hits both sides of it.

The host's state also lasts longer than a round and changes the ratio itself (a spell of contention slows the
larger model more): one pair of predictors timed in 12 blocks of 6 rounds read block ratios from 0.596 to 0.725
while each block's own interval was about ±5%. Consecutive rounds are not independent, so the interval is taken
over the means of blocks of ``BLOCK_ROUNDS`` rounds (batch means): rounds continue, a block at a time, until that
95% interval of the (geometric) mean ratio is within ``tolerance`` of it, or ``max_rounds``.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from train.errors import ConfigError
from train.inference import InferenceSession
from train.locks import quiet_host

Runner = Callable[[np.ndarray], object]  # a loaded model: Paddle Inference, onnxruntime, ...

# Rounds per block of the batch-means interval: even, so each block times both orders equally often; long enough
# (about a second at 640x640) that the blocks' means are nearly independent.
BLOCK_ROUNDS = 4
MIN_BLOCKS = 3


@dataclass(frozen=True)
class LatencyRatio:
    """Candidate latency / reference latency with its 95% confidence interval, from interleaved rounds."""

    ratio: float  # geometric mean of the per-round ratios (of whole blocks)
    low: float
    high: float
    rounds: int
    candidate_ms: float  # medians over the rounds, for the record
    reference_ms: float

    @property
    def half_width(self) -> float:
        """Relative half-width of the interval (0.03 = ±3%)."""
        return max(self.high / self.ratio - 1.0, 1.0 - self.low / self.ratio)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def check_rounds(min_rounds: int, max_rounds: int, tolerance: float, key: str = "measure") -> None:
    if min_rounds < MIN_BLOCKS * BLOCK_ROUNDS:
        raise ConfigError(f"{key}.min_rounds={min_rounds}: need at least {MIN_BLOCKS * BLOCK_ROUNDS} rounds "
                          f"({MIN_BLOCKS} blocks of {BLOCK_ROUNDS}) for an interval")
    if min_rounds % BLOCK_ROUNDS or max_rounds % BLOCK_ROUNDS:
        bad = "min_rounds" if min_rounds % BLOCK_ROUNDS else "max_rounds"
        raise ConfigError(f"{key}.{bad}={min_rounds if bad == 'min_rounds' else max_rounds}: must be a multiple of "
                          f"{BLOCK_ROUNDS} (rounds are timed in blocks of {BLOCK_ROUNDS})")
    if max_rounds < min_rounds:
        raise ConfigError(f"{key}.max_rounds={max_rounds}: must be >= {key}.min_rounds={min_rounds}")
    if not 0.0 < tolerance < 1.0:
        raise ConfigError(f"{key}.tolerance={tolerance}: must be in (0, 1)")


def round_settings(measure: Mapping[str, Any], key: str = "measure") -> dict[str, Any]:
    """The warm-up and round settings of a config node (`measure`, or the one named `key`), as `timed_rounds` takes
    them (checked)."""
    check_rounds(measure["min_rounds"], measure["max_rounds"], measure["tolerance"], key)
    return {name: measure[name] for name in ("warmup", "min_rounds", "max_rounds", "tolerance")}


def interval(log_ratios: list[float], block: int = BLOCK_ROUNDS) -> tuple[float, float, float]:
    """(geometric mean, low, high) of ratios given by their logs, in time order: a t interval on the mean log-ratio
    of consecutive blocks of ``block`` values (a trailing partial block is left out)."""
    n = len(log_ratios) // block
    if n < 2:
        raise ValueError(f"{len(log_ratios)} ratios make {n} block(s) of {block}: need 2 for an interval")
    means = [statistics.fmean(log_ratios[i * block:(i + 1) * block]) for i in range(n)]
    mean = statistics.fmean(means)
    spread = statistics.stdev(means) / math.sqrt(n) * float(stats.t.ppf(0.975, n - 1))
    return math.exp(mean), math.exp(mean - spread), math.exp(mean + spread)


def _timed(run: Runner, batch: np.ndarray) -> float:
    start = time.perf_counter()
    run(batch)
    return time.perf_counter() - start


def timed_rounds(candidate: Runner, reference: Runner, input_size: tuple[int, int], warmup: int = 3,
                 min_rounds: int = 12, max_rounds: int = 120, tolerance: float = 0.03) -> LatencyRatio:
    """Time two runners (a float32 NCHW batch in, anything out) against each other (module docstring)."""
    check_rounds(min_rounds, max_rounds, tolerance)
    runners = (candidate, reference)
    # Values do not change the work done; a fixed seed keeps invocations comparable anyway.
    batch = np.random.default_rng(0).random((1, 3, *input_size), dtype=np.float32)
    with quiet_host():  # the other workers of the host pause their training and evaluation meanwhile
        return _rounds(runners, batch, warmup, min_rounds, max_rounds, tolerance)


def _rounds(runners: tuple[Runner, Runner], batch: np.ndarray, warmup: int, min_rounds: int, max_rounds: int,
            tolerance: float) -> LatencyRatio:
    for _ in range(warmup):
        for run in runners:
            run(batch)
    times: list[tuple[float, float]] = []
    logs: list[float] = []
    while True:
        first = len(times) % 2  # alternate which model runs first
        pair = [0.0, 0.0]
        for index in (first, 1 - first):
            pair[index] = _timed(runners[index], batch)
        times.append((pair[0], pair[1]))
        logs.append(math.log(pair[0] / pair[1]))
        if len(logs) >= min_rounds and len(logs) % BLOCK_ROUNDS == 0:
            ratio, low, high = interval(logs)
            if max(high / ratio, ratio / low) - 1.0 <= tolerance or len(logs) >= max_rounds:
                break
    return LatencyRatio(ratio=ratio, low=low, high=high, rounds=len(logs),
                        candidate_ms=statistics.median(t[0] for t in times) * 1000.0,
                        reference_ms=statistics.median(t[1] for t in times) * 1000.0)


def interleaved_ratio(candidate: str | Path, reference: str | Path, input_size: tuple[int, int], threads: int = 2,
                      use_mkldnn: bool = True, **rounds) -> LatencyRatio:
    """``timed_rounds`` of the Paddle Inference programs exported in folders ``candidate`` and ``reference``."""
    sessions = [InferenceSession(folder, threads, use_mkldnn) for folder in (candidate, reference)]
    return timed_rounds(*sessions, input_size, **rounds)
