"""The engine's admission queue (engine/scheduler.py): FIFO order, positions, long-lived workers,
owner-scoped interrupt and skip, failures that leave the worker serving."""
from __future__ import annotations

import threading
import time

import pytest

from engine import Cancelled
from engine.scheduler import Scheduler


class Gate:
    """Work that blocks until released, recording the order and the thread it ran on."""

    def __init__(self):
        self.release = threading.Event()
        self.ran: list[str] = []
        self.threads: set[int] = set()

    def __call__(self, jobs):
        return [self.one(job) for job in jobs]

    def one(self, job):
        self.threads.add(threading.get_ident())
        if job.payload == "block":
            assert self.release.wait(10)
        if job.payload == "fail":
            return RuntimeError("work failed")
        if job.payload == "until-interrupted":
            while not job.interrupted:
                time.sleep(0.01)
            return Cancelled("interrupted")
        self.ran.append(job.payload)
        return job.payload.upper()


@pytest.fixture
def gate_scheduler():
    gate = Gate()
    scheduler = Scheduler(gate, workers=1, name="test")
    yield gate, scheduler
    gate.release.set()
    scheduler.close()


def _wait_running(job, timeout=5.0):
    deadline = time.monotonic() + timeout
    while job.state != "running":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.005)


def test_jobs_run_in_submission_order_on_one_long_lived_thread(gate_scheduler):
    gate, scheduler = gate_scheduler
    blocker = scheduler.submit("block")
    _wait_running(blocker)
    jobs = [scheduler.submit(name) for name in ("a", "b", "c")]
    assert [job.position for job in jobs] == [1, 2, 3] and blocker.position == 0
    assert scheduler.snapshot().job_count == 4
    gate.release.set()
    assert [job.result(5) for job in jobs] == ["A", "B", "C"]
    assert gate.ran == ["block", "a", "b", "c"]
    assert len(gate.threads) == 1 and threading.get_ident() not in gate.threads
    assert scheduler.snapshot().job_count == 0 and jobs[0].state == "done"


def test_interrupt_reaches_only_the_owners_jobs_and_queued_ones_never_run(gate_scheduler):
    gate, scheduler = gate_scheduler
    running = scheduler.submit("until-interrupted", owner="alice")
    _wait_running(running)
    alice_queued = scheduler.submit("alice-next", owner="alice")
    bob_queued = scheduler.submit("bob-next", owner="bob")
    assert scheduler.interrupt("carol") == 0
    assert scheduler.interrupt("alice") == 2
    with pytest.raises(Cancelled):
        running.result(5)
    with pytest.raises(Cancelled, match="^interrupted before it started$"):
        alice_queued.result(5)
    assert bob_queued.result(5) == "BOB-NEXT"
    assert gate.ran == ["bob-next"]


def test_an_external_cancel_flag_counts_as_an_interrupt(gate_scheduler):
    _, scheduler = gate_scheduler
    flag = threading.Event()
    job = scheduler.submit("until-interrupted", cancel=flag)
    _wait_running(job)
    flag.set()
    with pytest.raises(Cancelled):
        job.result(5)


def test_skip_flags_running_jobs_once(gate_scheduler):
    gate, scheduler = gate_scheduler
    blocker = scheduler.submit("block", owner="alice")
    waiting = scheduler.submit("x", owner="alice")
    _wait_running(blocker)
    assert scheduler.skip("alice") == 1  # only the running one
    assert blocker.take_skip() and not blocker.take_skip()
    assert not waiting.take_skip()
    gate.release.set()


def test_a_failing_job_leaves_the_worker_serving(gate_scheduler):
    _, scheduler = gate_scheduler
    failed = scheduler.submit("fail")
    after = scheduler.submit("after")
    with pytest.raises(RuntimeError, match="work failed"):
        failed.result(5)
    assert after.result(5) == "AFTER"


def test_close_cancels_waiting_jobs_and_refuses_new_ones():
    gate = Gate()
    scheduler = Scheduler(gate, workers=1)
    blocker = scheduler.submit("block")
    _wait_running(blocker)
    waiting = scheduler.submit("never")
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    with pytest.raises(Cancelled, match="^the server is shutting down$"):
        waiting.result(5)
    gate.release.set()
    closer.join(5)
    assert blocker.result(5) == "BLOCK"
    from engine import EngineError

    with pytest.raises(EngineError, match="^the engine is shutting down; try again on a running server$"):
        scheduler.submit("late")


def test_two_workers_run_two_jobs_at_once():
    gate = Gate()
    scheduler = Scheduler(gate, workers=2)
    try:
        first, second = scheduler.submit("block"), scheduler.submit("block")
        _wait_running(first)
        _wait_running(second)
        assert len(scheduler.snapshot().running) == 2
        gate.release.set()
        assert (first.result(5), second.result(5)) == ("BLOCK", "BLOCK")
        assert len(gate.threads) == 2
    finally:
        gate.release.set()
        scheduler.close()


class Recorder:
    """Executes batches of (kind, rows) payloads, recording each batch; ("block", 1) waits for release."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def __call__(self, jobs):
        if jobs[0].payload[0] == "block":
            assert self.release.wait(10)
        self.batches.append([job.payload[2] for job in jobs])
        return [job.payload[2] for job in jobs]


def _batching(wait_s: float = 0.0):
    from engine.scheduler import Batching

    return Batching(key=lambda p: None if p[0] in ("block", "solo") else p[0], rows=lambda p: p[1],
                    limit=lambda p: 4, wait_s=wait_s)


def test_waiting_jobs_of_one_kind_join_a_batch_up_to_its_row_limit_in_order():
    recorder = Recorder()
    scheduler = Scheduler(recorder, workers=1, batching=_batching())
    try:
        blocker = scheduler.submit(("block", 1, "block"))
        _wait_running(blocker)
        jobs = [scheduler.submit(p) for p in [("a", 1, "a1"), ("b", 1, "b1"), ("a", 2, "a2"), ("a", 1, "a4"),
                                              ("a", 1, "a5"), ("a", 2, "a3"), ("solo", 1, "s1"), ("solo", 1, "s2")]]
        jobs[3].interrupt()  # an interrupted job never joins a batch, and never runs
        recorder.release.set()
        for job in jobs[:3] + jobs[4:]:
            job.result(5)
        assert recorder.batches == [["block"], ["a1", "a2", "a5"], ["b1"], ["a3"], ["s1"], ["s2"]]
    finally:
        recorder.release.set()
        scheduler.close()


def test_a_worker_waits_for_more_jobs_only_while_the_batch_is_not_full():
    recorder = Recorder()
    scheduler = Scheduler(recorder, workers=1, batching=_batching(wait_s=0.8))
    try:
        first = scheduler.submit(("a", 1, "a1"))
        time.sleep(0.2)
        second = scheduler.submit(("a", 1, "a2"))  # arrives while the worker waits: same batch
        assert (first.result(5), second.result(5)) == ("a1", "a2") and recorder.batches == [["a1", "a2"]]
        started = time.monotonic()
        full = scheduler.submit(("a", 4, "full"))  # a full batch does not wait
        assert full.result(5) == "full" and time.monotonic() - started < 0.6
    finally:
        scheduler.close()


def test_wait_says_whether_the_job_is_done(gate_scheduler):
    gate, scheduler = gate_scheduler
    job = scheduler.submit("block")
    assert job.wait(0.05) is False and job.state in ("queued", "running")
    gate.release.set()
    assert job.wait(5) is True and job.state == "done" and job.id == "job-1" and job.number == 1
    later = scheduler.submit("b")
    assert later.id == "job-2" and later.progress is None
    later.report("step 1 of 2")
    assert later.progress == "step 1 of 2"


def test_listeners_see_each_outcome_before_the_caller_and_a_failing_one_is_ignored(gate_scheduler, caplog):
    _, scheduler = gate_scheduler
    seen = []

    def broken(job, outcome):
        raise ValueError("listener bug")

    def record(job, outcome):
        seen.append((job.payload, outcome if isinstance(outcome, str) else str(outcome), job.future.done()))

    scheduler.add_listener(broken)
    scheduler.add_listener(record)
    assert scheduler.submit("a").result(5) == "A"
    with pytest.raises(RuntimeError):
        scheduler.submit("fail").result(5)
    assert seen == [("a", "A", False), ("fail", "work failed", False)]
    assert [r.getMessage() for r in caplog.records if r.name == "engine.scheduler"] == ["a job listener failed"] * 2


def test_ensure_workers_adds_named_threads_up_to_the_count_and_none_once_closed():
    gate = Gate()
    scheduler = Scheduler(gate, workers=1, name="dev")
    try:
        scheduler.ensure_workers(3)
        scheduler.ensure_workers(2)  # never fewer
        assert scheduler.workers == 3
        assert [t.name for t in scheduler._threads] == ["dev-worker-0", "dev-worker-1", "dev-worker-2"]
        assert all(t.daemon and t.is_alive() for t in scheduler._threads)
        jobs = [scheduler.submit("block") for _ in range(3)]
        for job in jobs:
            _wait_running(job)  # three at once
        gate.release.set()
    finally:
        gate.release.set()
        scheduler.close()
    scheduler.ensure_workers(5)
    assert scheduler.workers == 3
    with pytest.raises(ValueError, match="^a scheduler needs at least one worker$"):
        Scheduler(gate, workers=0)


def test_work_that_raises_fails_its_jobs_and_the_worker_goes_on():
    calls = []

    def execute(jobs):
        calls.append([job.payload for job in jobs])
        if jobs[0].payload == "raise":
            raise ZeroDivisionError("device error")
        return ["ok"]

    scheduler = Scheduler(execute, workers=1)
    try:
        failed = scheduler.submit("raise")
        with pytest.raises(ZeroDivisionError, match="device error"):
            failed.result(5)
        after = scheduler.submit("after")
        assert after.result(5) == "ok" and calls == [["raise"], ["after"]]
        assert failed.submitted <= failed.started <= failed.finished <= after.started
    finally:
        scheduler.close()


def test_a_job_the_work_settled_early_keeps_that_outcome_and_listeners_see_it():
    def execute(jobs):
        jobs[0].future.set_result("early")  # it left its batch before the batch ended
        return ["late"]

    scheduler = Scheduler(execute, workers=1)
    seen = []
    scheduler.add_listener(lambda job, outcome: seen.append((job.payload, outcome)))
    try:
        assert scheduler.submit("a").result(5) == "early"
        assert scheduler.submit("b").result(5) == "early"
        assert seen == [("a", "early"), ("b", "early")]
    finally:
        scheduler.close()
