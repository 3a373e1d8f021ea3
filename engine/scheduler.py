"""The engine's one admission queue and its long-lived device worker threads.

Every generation — a UI click, an HTTP API call, a SageMaker invocation — is a ``Job`` submitted
here. Jobs wait in one FIFO; ``workers`` long-lived threads take them in order and run them. Torch
work therefore always runs on the same few threads, whatever thread the request arrived on (on
this 2-core machine torch work moved between threads ran ~3x slower: OpenMP keeps a thread team
per calling thread and an idle team spins).

With a ``Batching`` policy a worker that frees up takes the first waiting job *and* the waiting
jobs that can share its device call (same ``key``), in queue order, up to the row ``limit`` of the
first — optionally waiting ``wait_s`` for company when it would run short. Jobs never overtake a
job they cannot run with except by joining an earlier compatible one.

The interface is deliberately small, so that replicas can plug in behind it too:

- ``submit(work, owner, ...) -> Job``: queue a job; ``Job.result()`` waits for it.
- ``Job.position``: 0 while running, ``n`` while ``n - 1`` jobs are ahead of it.
- ``interrupt(owner)`` / ``skip(owner)``: flag that owner's jobs (and nobody else's).
- ``snapshot()``: what is running and waiting, for progress reports.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Optional, Protocol, TypeVar

from .errors import Cancelled, EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class Job(Generic[T]):
    """One queued unit of device work and everything a caller may ask about it.

    ``payload`` is what was submitted (a ``GenerateRequest`` for the engine); ``progress`` is the
    latest report of the running job (set by the work through ``report``); ``cancel`` is an extra
    flag of the caller's (e.g. a browser session's Interrupt button) checked with the job's own.
    """

    def __init__(self, scheduler: "Scheduler[T]", number: int, payload: Any, owner: str,
                 cancel: Optional[CancelFlag] = None):
        self.id = f"job-{number}"
        self.number = number
        self.payload = payload
        self.owner = owner
        self.submitted = time.time()
        self.started: Optional[float] = None
        self.finished: Optional[float] = None
        self.future: "Future[T]" = Future()
        self.progress: Any = None
        self._scheduler = scheduler
        self._interrupted = threading.Event()
        self._skipped = threading.Event()
        self._cancel = cancel

    # --- caller side ---------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """0 while running (or done), else 1 + the number of jobs ahead of it in the queue."""
        return self._scheduler.position(self)

    @property
    def state(self) -> str:
        """``queued``, ``running`` or ``done``."""
        if self.future.done():
            return "done"
        return "running" if self.started is not None else "queued"

    def result(self, timeout: Optional[float] = None) -> T:
        """Wait for the job; raises what the work raised (``Cancelled`` when interrupted)."""
        return self.future.result(timeout)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait up to ``timeout`` seconds; True once the job is done."""
        done, _ = futures.wait([self.future], timeout)
        return bool(done)

    def interrupt(self) -> None:
        """Stop at the next step boundary (or before starting); ``result()`` raises ``Cancelled``."""
        self._interrupted.set()

    def skip(self) -> None:
        """Abandon the image being made and go on with the job's next one (A1111's Skip)."""
        self._skipped.set()

    # --- work side -----------------------------------------------------------------------------

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set() or (self._cancel is not None and self._cancel.is_set())

    def take_skip(self) -> bool:
        """True once per Skip: the work abandons its current image and clears the flag."""
        if self._skipped.is_set():
            self._skipped.clear()
            return True
        return False

    def report(self, progress: Any) -> None:
        self.progress = progress


@dataclass(frozen=True)
class Batching:
    """Which queued payloads may run together: ``key`` (None: always alone), the ``rows`` each
    needs and the most rows one call of the first job's kind takes (``limit``); ``wait_s``: how long
    a worker waits for more compatible jobs when the batch is not full (0: take what is there)."""

    key: Callable[[Any], Optional[Hashable]]
    rows: Callable[[Any], int]
    limit: Callable[[Any], int]
    wait_s: float = 0.0


@dataclass(frozen=True)
class QueueSnapshot:
    """Jobs running (oldest first) and waiting (in the order they will run)."""

    running: tuple[Job, ...]
    waiting: tuple[Job, ...]

    @property
    def job_count(self) -> int:
        return len(self.running) + len(self.waiting)


Outcome = Any  # a job's result, or the BaseException it ends with


class Scheduler(Generic[T]):
    """One FIFO of jobs, served by ``workers`` long-lived threads that call ``execute(batch)``.

    ``execute`` runs on a worker thread with a list of jobs (one, unless ``batching`` groups more)
    and returns one outcome per job: its result or the exception it ends with; if ``execute``
    raises, every job of the batch ends with that. A job interrupted while still queued is answered
    ``Cancelled`` without running; one whose future the work already settled (it left its batch
    early) keeps that outcome. Exceptions never stop a worker.
    """

    def __init__(self, execute: Callable[[list[Job[T]]], list[Outcome]], workers: int = 1, name: str = "device",
                 batching: Optional[Batching] = None):
        if workers < 1:
            raise ValueError("a scheduler needs at least one worker")
        self._execute = execute
        self._batching = batching
        self._condition = threading.Condition()
        self._waiting: deque[Job[T]] = deque()
        self._running: list[Job[T]] = []
        self._numbers = itertools.count(1)
        self._closed = False
        self._listeners: list[Callable[[Job[T], Outcome], None]] = []
        self.name = name
        self._threads = [threading.Thread(target=self._work, name=f"{name}-worker-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    def add_listener(self, listener: Callable[[Job[T], Outcome], None]) -> None:
        """Call ``listener(job, outcome)`` on the worker thread when each job ends, just before its
        caller sees the outcome (its result or exception). A listener that raises is logged and ignored."""
        self._listeners.append(listener)

    def ensure_workers(self, count: int) -> None:
        """Start more worker threads until there are at least ``count`` (e.g. one per replica)."""
        with self._condition:
            while len(self._threads) < count and not self._closed:
                thread = threading.Thread(target=self._work, name=f"{self.name}-worker-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()

    def submit(self, payload: Any, owner: str = "", cancel: Optional[CancelFlag] = None) -> Job[T]:
        """Queue ``payload`` for ``owner`` (who may interrupt it); returns at once."""
        with self._condition:
            if self._closed:
                raise EngineError("the engine is shutting down; try again on a running server")
            job: Job[T] = Job(self, next(self._numbers), payload, owner, cancel)
            self._waiting.append(job)
            self._condition.notify()
        return job

    def position(self, job: Job[T]) -> int:
        with self._condition:
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return 0

    def snapshot(self) -> QueueSnapshot:
        with self._condition:
            return QueueSnapshot(tuple(self._running), tuple(self._waiting))

    def jobs_of(self, owner: str) -> list[Job[T]]:
        """``owner``'s running and waiting jobs, running first."""
        snapshot = self.snapshot()
        return [job for job in (*snapshot.running, *snapshot.waiting) if job.owner == owner]

    def interrupt(self, owner: str) -> int:
        """Interrupt every running or waiting job of ``owner``; returns how many were flagged."""
        jobs = self.jobs_of(owner)
        for job in jobs:
            job.interrupt()
        return len(jobs)

    def skip(self, owner: str) -> int:
        """Skip the current image of ``owner``'s running jobs; returns how many were flagged."""
        jobs = [job for job in self.jobs_of(owner) if job.state == "running"]
        for job in jobs:
            job.skip()
        return len(jobs)

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new jobs, cancel the waiting ones and let the workers finish their current job."""
        with self._condition:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._condition.notify_all()
        for job in waiting:
            job.future.set_exception(Cancelled("the server is shutting down"))
        for thread in self._threads:
            thread.join(timeout)

    def _next(self) -> list[Job[T]]:
        """The next batch to run (empty when closing); marks its jobs running."""
        with self._condition:
            while not self._waiting and not self._closed:
                self._condition.wait()
            if self._closed:
                return []
            batch = [self._waiting.popleft()]
            if self._batching is not None:
                self._gather(batch)
            started = time.time()
            for job in batch:
                job.started = started
                self._running.append(job)
            return batch

    def _gather(self, batch: list[Job[T]]) -> None:
        """Move the waiting jobs that can run with ``batch[0]`` into ``batch`` (lock held)."""
        policy = self._batching
        assert policy is not None
        key = policy.key(batch[0].payload)
        if key is None:
            return
        limit, rows = policy.limit(batch[0].payload), policy.rows(batch[0].payload)
        deadline = time.monotonic() + policy.wait_s
        while True:
            for job in list(self._waiting):
                need = policy.rows(job.payload)
                if rows + need <= limit and policy.key(job.payload) == key and not job.interrupted:
                    self._waiting.remove(job)
                    batch.append(job)
                    rows += need
            left = deadline - time.monotonic()
            if rows >= limit or left <= 0 or self._closed:
                return
            self._condition.wait(left)

    def _work(self) -> None:
        while batch := self._next():
            try:
                pending = [job for job in batch if not job.interrupted]
                outcomes = dict(zip(pending, self._execute(pending))) if pending else {}
            except BaseException as exc:  # the callers get it; the worker keeps serving
                outcomes = {job: exc for job in batch}
            with self._condition:
                for job in batch:
                    self._running.remove(job)
                    job.finished = time.time()
            for job in batch:
                outcome = outcomes.get(job, Cancelled("interrupted before it started"))
                if job.future.done():  # the work settled it early (it left its batch)
                    self._notify(job, job.future.exception() or job.future.result())
                    continue
                self._notify(job, outcome)  # before the caller can see the outcome, so metrics agree
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _notify(self, job: Job[T], outcome: Outcome) -> None:
        for listener in self._listeners:
            try:
                listener(job, outcome)
            except Exception:
                log.exception("a job listener failed")


__all__ = ["Scheduler", "Job", "QueueSnapshot", "CancelFlag", "Batching"]
