"""Liveness of the workers that share a study: a daemon thread that beats while a worker holds something (its
running trials, or the study while it builds the prior), and the rule that tells a stopped worker's holdings from
live ones.

Optuna's own heartbeat (`RDBStorage(heartbeat_interval=...)` with `fail_stale_trials`) exists for RDB storages
only and runs inside `study.optimize`, which the ask/tell sweeper does not use; `JournalStorage` has none. So one
mechanism serves every storage: wall-clock timestamps written as user attributes. Workers on several hosts need
synchronised clocks (NTP keeps them within milliseconds, far inside any sensible grace).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig

from search.config import mask_url
from train.errors import ConfigError

log = logging.getLogger(__name__)


def worker_id() -> str:
    """This worker's name in the study (host and process), for logs and trial attributes."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Liveness:
    """`search.heartbeat`: beat every `interval` seconds; a holding without a beat for `grace` seconds is stale."""

    interval: float
    grace: float

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Liveness:
        interval, grace = float(cfg.interval), float(cfg.grace)
        if not interval > 0:
            raise ConfigError(f"search.heartbeat.interval={cfg.interval}: must be > 0 seconds")
        # One late beat (a slow storage write, a busy host) must not make a live worker look dead.
        if not grace >= 2 * interval:
            raise ConfigError(f"search.heartbeat.grace={cfg.grace}: must be at least twice "
                              f"search.heartbeat.interval={cfg.interval}")
        return cls(interval=interval, grace=grace)

    def is_stale(self, last_beat: float) -> bool:
        return time.time() - last_beat > self.grace


class Heartbeat:
    """Calls `beat()` every `interval` seconds in a daemon thread while the `with` block runs.

    A failing beat (storage briefly unreachable) is logged and retried at the next interval rather than ending
    the thread: a few missed beats are what the grace period is for. The thread is a daemon so that a worker that
    dies takes its heartbeat with it, which is the whole point.
    """

    def __init__(self, interval: float, beat: Callable[[], None], name: str):
        self.interval = interval
        self.beat = beat
        self.name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{name}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # any storage error: the next beat may succeed
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                log.warning("heartbeat of %s failed (%s: %s)", self.name, type(exc).__name__, mask_url(first))

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
