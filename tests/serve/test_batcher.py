"""The micro-batching worker: compatible jobs share a batch, others keep their place; limits and cancellation."""

import threading

import pytest

from pocketdiff.serve.batcher import Batcher, Job, QueueFull


def job(key="a", n=1, prompt="p"):
    return Job(prompts=[prompt] * n, seeds=list(range(n)), negative_prompt=None, key=(key,))


class Recorder:
    """run_batch that records each batch's job prompts, optionally held until released."""

    def __init__(self, hold: bool = False):
        self.batches, self.release = [], threading.Event()
        if not hold:
            self.release.set()
        self.started = threading.Event()

    def __call__(self, jobs):
        self.started.set()
        self.release.wait(10)
        self.batches.append([(j.key[0], len(j.prompts)) for j in jobs])
        return [[f"{j.key[0]}-{i}" for i in range(len(j.prompts))] for j in jobs]


def test_waiting_jobs_of_one_key_share_a_batch_up_to_max_batch_and_other_keys_keep_their_order():
    run = Recorder(hold=True)
    b = Batcher(run, max_batch=4, max_wait_s=0.05)
    first = b.submit(job("a"))
    run.started.wait(5)  # the worker holds the first batch: the rest queue up behind it
    jobs = [b.submit(job(k, n)) for k, n in [("a", 2), ("b", 1), ("a", 1), ("a", 2), ("b", 3)]]
    run.release.set()
    for j in [first, *jobs]:
        j.future.result(timeout=10)
    b.stop()
    assert run.batches == [[("a", 1)], [("a", 2), ("a", 1)], [("b", 1), ("b", 3)], [("a", 2)]]
    assert jobs[0].future.result() == ["a-0", "a-1"] and jobs[0].state == "done"


def test_a_full_queue_refuses_and_a_cancelled_job_is_dropped_before_it_runs():
    run = Recorder(hold=True)
    b = Batcher(run, max_queue=2, max_batch=1, max_wait_s=0)
    b.submit(job("a"))
    run.started.wait(5)
    waiting = [b.submit(job("b")), b.submit(job("c"))]
    with pytest.raises(QueueFull):
        b.submit(job("d"))
    waiting[0].cancel()
    run.release.set()
    waiting[1].future.result(timeout=10)
    b.stop()
    assert [k for batch in run.batches for k, _ in batch] == ["a", "c"] and waiting[0].state == "cancelled"


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on():
    calls = []

    def run(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return [["ok"] for _ in jobs]

    b = Batcher(run, max_batch=1, max_wait_s=0)
    bad, good = b.submit(job("a")), b.submit(job("b"))
    with pytest.raises(RuntimeError, match="out of memory"):
        bad.future.result(timeout=10)
    assert good.future.result(timeout=10) == ["ok"]
    b.stop()


def test_a_job_larger_than_a_batch_is_refused():
    b = Batcher(Recorder(), max_batch=2)
    with pytest.raises(ValueError, match="max_batch"):
        b.submit(job(n=3))
    b.stop()
