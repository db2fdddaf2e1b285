"""A bounded request queue and one worker thread that groups compatible requests into one UNet batch.

Requests (:class:`Job`) with the same :attr:`Job.key` (sampler, steps, guidance, height, width) can share a
batch: the worker takes the oldest waiting job, then for up to ``max_wait_s`` adds later jobs of the same key
while the batch holds at most ``max_batch`` images, and runs them as one call of ``run_batch``. Jobs of other
keys keep their place in the queue. A cancelled job (its client timed out or went away) is dropped before it
runs; a batch whose jobs are all cancelled stops at its next step (``run_batch`` polls :meth:`Job.live`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs already: the caller answers 429."""


@dataclass
class Job:
    prompts: list[str]  # one per image
    seeds: list[int]  # one per image
    negative_prompt: str | None
    key: tuple  # (sampler, steps, guidance, height, width): what must match to share a batch
    id: str = ""
    future: Future = field(default_factory=Future)  # set to the list of images (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    step: int = 0  # sampling steps done (progress)
    state: str = "queued"  # queued | running | done | cancelled
    enqueued: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()
        if self.state == "queued":
            self.state = "cancelled"

    def live(self) -> bool:
        return not self.cancelled.is_set()


class Batcher:
    """``submit(job)`` from any thread; one daemon worker runs ``run_batch(jobs) -> list of per-job results``."""

    def __init__(self, run_batch: Callable[[list[Job]], list], *, max_queue: int = 64, max_batch: int = 8,
                 max_wait_s: float = 0.02, on_batch: Callable[[list[Job], float], None] | None = None):
        if max_queue < 1 or max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_queue and max_batch must be >= 1 and max_wait_s >= 0")
        self.run_batch, self.on_batch = run_batch, on_batch
        self.max_queue, self.max_batch, self.max_wait_s = max_queue, max_batch, max_wait_s
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="pocketdiff-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        with self._cv:
            return len(self._jobs)

    def submit(self, job: Job) -> Job:
        if len(job.prompts) > self.max_batch:
            raise ValueError(f"a job of {len(job.prompts)} images does not fit max_batch={self.max_batch}")
        with self._cv:
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting")
            self._jobs.append(job)
            self._cv.notify_all()
        return job

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def _take_batch(self) -> list[Job] | None:
        """The oldest live job and the compatible jobs that arrive within max_wait_s (None once stopped)."""
        with self._cv:
            first = None
            while first is None:
                while not self._jobs and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return None
                first = self._jobs.popleft()
                if not first.live():
                    first = None
            batch, size = [first], len(first.prompts)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                for job in list(self._jobs):
                    if job.key == first.key and size + len(job.prompts) <= self.max_batch:
                        self._jobs.remove(job)
                        if job.live():
                            batch.append(job)
                            size += len(job.prompts)
                remaining = deadline - time.monotonic()
                if size >= self.max_batch or remaining <= 0:
                    break
                self._cv.wait(timeout=remaining)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            for job in batch:
                job.state = "running"
            t0 = time.perf_counter()
            try:
                results = self.run_batch(batch)
            except Exception as e:  # the server answers 500 for these jobs and keeps serving
                results = [e] * len(batch)
            for job, result in zip(batch, results):
                job.state = "cancelled" if not job.live() else "done"
                if not job.live():
                    job.future.cancel()  # nobody waits for it any more
                if job.future.done():
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            if self.on_batch is not None:
                self.on_batch(batch, time.perf_counter() - t0)
