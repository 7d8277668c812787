"""The server's batcher: one thread that owns the models and runs waiting requests of the same kind
together, so that concurrent users share a forward pass (see `blip2.serve.app`)."""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blip2.errors import UserError


@dataclass
class Job:
    """One unit of work: `group` jobs may run together; `payload` is the job's own input. A job
    cancelled (`Batcher.cancel`) before its turn is skipped."""

    group: tuple[Any, ...]
    payload: Any
    done: Callable[[Any, BaseException | None], None]
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    started: bool = False


class QueueFull(Exception):
    """`Batcher.submit` when `max_queue` jobs are already waiting."""


class Batcher:
    """A thread that runs jobs in batches. `run_group(group, payloads) -> results` does the work.

    Jobs of the same `group` waiting together (up to `max_batch`, collected for up to `wait_s` after
    the first) run in one call; results go back through each job's `done` callback. Each job is
    first checked on its own by `prepare(group, payload) -> payload` (when given, in this thread): a
    job it refuses gets that error alone, and the others run. A batch failing with a `UserError` (the
    fault of one request, not of the server) runs again one job at a time, so that each job gets its
    own answer or its own error; a batch failing otherwise fails each of its jobs with the error. At
    most `max_queue` jobs wait (0: no limit); cancelled jobs do not count and are skipped.
    """

    def __init__(
        self,
        run_group: Callable[[tuple[Any, ...], list[Any]], list[Any]],
        max_batch: int,
        wait_s: float,
        max_queue: int = 0,
        prepare: Callable[[tuple[Any, ...], Any], Any] | None = None,
    ):
        self.run_group = run_group
        self.prepare = prepare
        self.max_batch = max(1, max_batch)
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.waiting = 0  # jobs submitted, neither started nor cancelled
        self._lock = threading.Lock()
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.requests = 0
        self.batches = 0
        self.largest_batch = 0
        self._held: list[Job] = []  # taken from the queue but of another group
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="blip2-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; `QueueFull` when `max_queue` jobs are already waiting."""
        with self._lock:
            if self.max_queue and self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting")
            self.waiting += 1
        self.queue.put(job)

    def cancel(self, job: Job) -> None:
        """Skip `job` if it has not started (e.g. its request timed out); its `done` is never called."""
        with self._lock:
            if not job.started and not job.cancelled:
                job.cancelled = True
                self.waiting -= 1

    def close(self) -> None:
        """Stop after the jobs already taken (None in the queue is the stop sign)."""
        self._closing = True
        self.queue.put(None)
        self._thread.join(timeout=5)

    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.pop(0)
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            if first.cancelled:
                continue
            jobs, others = [first], []
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 and not self._held and self.queue.empty():
                    break
                nxt = self._next(max(left, 0.0) if not self._held else None)
                if nxt is None:
                    if self._closing:  # that None was the stop sign: keep it for the outer loop
                        self.queue.put(None)
                        break
                    if left <= 0:
                        break
                    continue
                if not nxt.cancelled:
                    (jobs if nxt.group == first.group else others).append(nxt)
            self._held = others + self._held
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        with self._lock:  # jobs cancelled while waiting are dropped; the rest can no longer be
            jobs = [j for j in jobs if not j.cancelled]
            for j in jobs:
                j.started = True
            self.waiting -= len(jobs)
        self.requests += len(jobs)
        ready = []
        for j in jobs:  # each job checked on its own: a bad request must not fail the others
            try:
                j.payload = j.payload if self.prepare is None else self.prepare(j.group, j.payload)
            except Exception as e:
                j.done(None, e)
                continue
            ready.append(j)
        if not ready:
            return
        try:
            self._batch(ready)
        except UserError:  # one job's fault: each job alone gets its own answer or its own error
            for j in ready:
                try:
                    self._batch([j])
                except BaseException as e:
                    j.done(None, e)
        except BaseException as e:  # each waiting request gets the error
            for j in ready:
                j.done(None, e)

    def _batch(self, jobs: list[Job]) -> None:
        """Run `jobs` as one batch and answer each; raises what the batch raised (nobody answered)."""
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        results = self.run_group(jobs[0].group, [j.payload for j in jobs])
        for j, r in zip(jobs, results, strict=True):
            j.done(r, None)
