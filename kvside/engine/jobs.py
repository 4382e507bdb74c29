"""Long engine work that must not stall the streams of other sessions (compiling a document,
writing a summary, re-prefilling a session, reading a session file): written as generators that
yield between chunks, run a chunk at a time between decode steps by the engine loop
(Core.start_job, Core.advance_job), or to their end at once with `finish`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("kvside")

JOB_CHUNK = 128  # tokens a job decodes between two decode steps of the generations


def finish(steps):
    """Run a job's generator to its end, now, and return its result (the synchronous form of
    every long edit: benchmarks and the library's own callers)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@dataclass
class LongWork:
    """What an engine task returns to run as a job instead of at once: a generator that yields
    between chunks of work (a compile, a summary, a re-prefill, a restore) and returns the task's
    result. `session`: the session it works on (busy meanwhile)."""

    steps: object
    session: str | None = None
    needs_job_seq: bool = False


@dataclass
class Job:
    """A LongWork in progress; see Core.start_job."""

    steps: object
    future: object
    session: object  # the Session it works on, or None
    needs_job_seq: bool = False


class JobRunner:
    """The jobs in progress; the engine loop advances one chunk of one job per step."""

    def __init__(self, core):
        self.core = core
        self.jobs: list[Job] = []
        self.job_seq_owner: Job | None = None

    @property
    def active(self) -> bool:
        return bool(self.jobs)

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def start(self, steps, future, session: str | None, needs_job_seq: bool = False) -> None:
        """Run the generator `steps` a chunk at a time between decode steps; its return value (or
        exception) resolves `future`. Its session, if any, is busy meanwhile: other work for it
        waits in its backlog, and binding and eviction pass it by."""
        s = self.core.sessions.get(session) if session else None
        if s is not None:
            s.busy = True
        self.jobs.append(Job(steps, future, s, needs_job_seq))

    def advance(self) -> None:
        """One chunk of the first job that may run (jobs that need the job sequence take turns)."""
        for job in list(self.jobs):
            if job.needs_job_seq and self.job_seq_owner not in (None, job):
                continue
            if job.needs_job_seq:
                self.job_seq_owner = job
            self.jobs.remove(job)
            try:
                next(job.steps)
            except StopIteration as done:
                self._end(job)
                job.future.set_result(done.value)
            except BaseException as exc:  # the job's own error, for its caller
                self._end(job)
                job.future.set_exception(exc)
            else:
                self.jobs.append(job)  # round robin among jobs
            return

    def _end(self, job: Job) -> None:
        if self.job_seq_owner is job:
            self.job_seq_owner = None
            self.core.mem.clear_seq(self.core.job_seq)
        s = job.session
        if s is not None:
            s.busy = False
            s.last_used = time.time()
            self.core.ready.extend(s.backlog)
            s.backlog.clear()
            self.core.session_freed()

    def stop_all(self, error) -> None:
        """Close every job (their snapshots roll their sessions back) and fail their callers."""
        for job in list(self.jobs):
            self.jobs.remove(job)
            try:
                job.steps.close()
            except BaseException as exc:  # a job that cannot even stop cleanly
                log.error("a job failed while stopping: %s", exc)
            self._end(job)
            job.future.set_exception(error)  # running since its task was dispatched
