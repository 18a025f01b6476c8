"""The host's CPU lock: a latency measurement (`quiet_host`) waits for other processes' running work units and
holds back new ones, even from a process that takes them back to back; without the lock it does nothing."""
from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from train.locks import CPU_LOCK_ENV, cpu_work, quiet_host

_CONTEXT = multiprocessing.get_context("fork")
_WAIT_S = 60  # generous: the assertions never depend on how fast the machine is


def _hold(kind: str, lock: str, holding, release) -> None:
    import os
    os.environ[CPU_LOCK_ENV] = lock
    with (quiet_host() if kind == "quiet" else cpu_work()):
        holding.set()
        release.wait(_WAIT_S)


def _work_loop(lock: str, units, stop) -> None:
    import os
    os.environ[CPU_LOCK_ENV] = lock
    while not stop.is_set():
        with cpu_work():
            units.value += 1


def _started_worker(lock: str):
    """A process that takes work units back to back, once it has done some: (process, unit count, stop)."""
    units, stop = _CONTEXT.Value("i", 0), _CONTEXT.Event()
    worker = _CONTEXT.Process(target=_work_loop, args=(lock, units, stop))
    worker.start()
    deadline = time.monotonic() + _WAIT_S
    while units.value < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert units.value >= 100, "the worker never ran"
    return worker, units, stop


def _in_thread(block) -> tuple[threading.Thread, threading.Event]:
    entered = threading.Event()

    def run() -> None:
        with block():
            entered.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, entered


@pytest.mark.parametrize("holder, waiter", [("quiet", cpu_work), ("work", quiet_host), ("quiet", quiet_host)])
def test_a_held_lock_blocks_the_other_side_until_released(tmp_path: Path, monkeypatch, holder, waiter):
    lock = str(tmp_path / "cpu.lock")
    monkeypatch.setenv(CPU_LOCK_ENV, lock)
    holding, release = _CONTEXT.Event(), _CONTEXT.Event()
    other = _CONTEXT.Process(target=_hold, args=(holder, lock, holding, release))
    other.start()
    try:
        assert holding.wait(_WAIT_S)
        thread, entered = _in_thread(waiter)
        assert not entered.wait(0.5), "entered while the other process held the lock"
        release.set()
        assert entered.wait(_WAIT_S)
        thread.join(_WAIT_S)
    finally:
        release.set()
        other.join(_WAIT_S)
    assert other.exitcode == 0


def test_work_units_taken_back_to_back_cannot_starve_a_timing(tmp_path: Path, monkeypatch):
    lock = str(tmp_path / "cpu.lock")
    monkeypatch.setenv(CPU_LOCK_ENV, lock)
    worker, units, stop = _started_worker(lock)
    try:
        thread, entered = _in_thread(quiet_host)
        assert entered.wait(_WAIT_S), "the timing never got the machine"
        # (the thread is inside its block until it returns: the worker is held back meanwhile)
        thread.join(_WAIT_S)
        after = units.value
        deadline = time.monotonic() + _WAIT_S
        while units.value == after and time.monotonic() < deadline:
            time.sleep(0.01)
        assert units.value > after, "the worker did not resume after the timing"
    finally:
        stop.set()
        worker.join(_WAIT_S)


def test_a_timing_holds_work_back_for_its_whole_block(tmp_path: Path, monkeypatch):
    lock = str(tmp_path / "cpu.lock")
    monkeypatch.setenv(CPU_LOCK_ENV, lock)
    worker, units, stop = _started_worker(lock)
    try:
        with quiet_host():
            before = units.value
            time.sleep(0.3)
            assert units.value == before
            with cpu_work(), quiet_host():  # nested in this process's own block: no deadlock
                pass
    finally:
        stop.set()
        worker.join(_WAIT_S)


def test_a_process_without_the_variable_takes_no_part(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(CPU_LOCK_ENV, raising=False)
    holding, release = _CONTEXT.Event(), _CONTEXT.Event()
    other = _CONTEXT.Process(target=_hold, args=("quiet", str(tmp_path / "cpu.lock"), holding, release))
    other.start()
    try:
        assert holding.wait(_WAIT_S)
        thread, entered = _in_thread(cpu_work)
        assert entered.wait(_WAIT_S), "blocked by a lock it does not share"
        with quiet_host():
            pass
    finally:
        release.set()
        other.join(_WAIT_S)
