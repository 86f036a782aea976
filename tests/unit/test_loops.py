"""The loop runner: rounds only while this process leads, recovery on becoming the leader, a wake-up
instead of the poll, and a loop that survives its errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from exchange.errors import DatabaseUnavailable
from exchange.loops import LoopRunner


class Leadership:
    """An in-memory coordination: leadership is whatever the test says."""

    retry_seconds = 0.01

    def __init__(self) -> None:
        self.leading = False
        self.subscribers: dict[str, list[Callable[[], None]]] = {}

    def want(self, name: str) -> None:
        pass

    def leads(self, name: str) -> bool:
        return self.leading

    def subscribe(self, channel: str, wake: Callable[[], None]) -> None:
        self.subscribers.setdefault(channel, []).append(wake)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


class Recording:
    interval = 0.01

    def __init__(self, wait: float = 60.0, fail: BaseException | None = None) -> None:
        self.wait = wait
        self.fail = fail
        self.leads = 0
        self.steps = 0

    def lead(self) -> None:
        self.leads += 1

    def step(self) -> float:
        self.steps += 1
        if self.fail is not None:
            raise self.fail
        return self.wait


def running(loop: Recording, leadership: Leadership) -> tuple[LoopRunner, threading.Thread]:
    runner = LoopRunner("test", loop, leadership, ("exchange_outbox",))
    thread = threading.Thread(target=runner.run_forever, daemon=True)
    thread.start()
    return runner, thread


def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_rounds_run_only_while_leading_and_each_new_leadership_recovers_first() -> None:
    leadership, loop = Leadership(), Recording(wait=0.0)
    runner, thread = running(loop, leadership)
    time.sleep(0.05)
    assert loop.steps == 0
    leadership.leading = True
    until(lambda: loop.steps > 3)
    assert loop.leads == 1
    leadership.leading = False
    time.sleep(0.05)
    steps = loop.steps
    time.sleep(0.05)
    assert loop.steps == steps  # a deposed leader runs no round
    leadership.leading = True
    until(lambda: loop.leads == 2)
    runner.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_wake_up_starts_the_next_round_at_once_instead_of_the_poll() -> None:
    leadership, loop = Leadership(), Recording(wait=60.0)
    leadership.leading = True
    runner, thread = running(loop, leadership)
    until(lambda: loop.steps == 1)
    for wake in leadership.subscribers["exchange_outbox"]:  # a NOTIFY from another process
        wake()
    until(lambda: loop.steps == 2, timeout=1.0)
    runner.wake()  # a submission in this process
    until(lambda: loop.steps == 3, timeout=1.0)
    runner.stop()
    thread.join(timeout=5)


def test_the_loop_survives_its_errors() -> None:
    for error in (DatabaseUnavailable("down"), RuntimeError("bug")):
        leadership, loop = Leadership(), Recording(fail=error)
        leadership.leading = True
        runner, thread = running(loop, leadership)
        until(lambda loop=loop: loop.steps > 3)  # type: ignore[misc]
        runner.stop()
        thread.join(timeout=5)
