"""The node's background loops, each led by one process at a time and woken by the events it waits on.

A loop is a :class:`Loop`: one round at a time (:meth:`Loop.step`), which says how long it may sleep
before the next round is due. :class:`LoopRunner` runs a loop in a thread for the lifetime of the
app, and guarantees that:

- a round runs only while this process leads the loop (:mod:`exchange.db.coordination`); when it
  becomes the leader, :meth:`Loop.lead` runs first (for example, the delivery loop takes back the
  leases its predecessor held);
- a wake-up (a submission in this process, or a NOTIFY from any process) starts the next round at
  once; the sleep the round asked for is only the fallback poll;
- the loop never dies: an unavailable database is waited out silently (the database logs it once),
  any other error is logged with its traceback and retried after the loop's ``interval``.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from exchange.db.coordination import Coordination
from exchange.errors import DatabaseUnavailable, TransactionConflict

log = logging.getLogger("exchange.loops")


class Loop(Protocol):
    """A background duty of the node."""

    #: the fallback poll, and the pause after a failed round
    interval: float

    def lead(self) -> None:
        """This process has just become the loop's leader: recover what a predecessor left."""

    def step(self) -> float:
        """One round; returns the seconds after which the next round is due unless woken earlier
        (0: at once, more work is waiting)."""


class LoopRunner:
    """Runs one :class:`Loop` until :meth:`stop` (see the module docstring)."""

    def __init__(
        self, name: str, loop: Loop, coordination: Coordination, channels: tuple[str, ...] = ()
    ) -> None:
        self.name = name
        self.loop = loop
        self.coordination = coordination
        self.channels = channels
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.leading = False

    def wake(self) -> None:
        """Start the next round now (if this process leads the loop)."""
        self._wake.set()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._wake.wait(seconds)
        self._wake.clear()

    def run_forever(self) -> None:
        self.coordination.want(self.name)
        for channel in self.channels:
            self.coordination.subscribe(channel, self.wake)
        while not self._stop.is_set():
            if not self.coordination.leads(self.name):
                if self.leading:
                    log.warning("%s: no longer the leader in this process", self.name)
                    self.leading = False
                self._sleep(self.coordination.retry_seconds)
                continue
            try:
                if not self.leading:
                    self.loop.lead()
                    self.leading = True
                wait = self.loop.step()
            except DatabaseUnavailable:
                wait = self.loop.interval
            except TransactionConflict as exc:  # nothing of it written; the next round runs it again
                log.warning("%s round: %s; retrying", self.name, exc)
                wait = self.loop.interval
            except Exception:
                log.exception("%s round failed; retrying", self.name)
                wait = self.loop.interval
            if not self._stop.is_set():
                self._sleep(wait)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
