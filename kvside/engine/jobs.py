"""Long engine work that must not stall the streams of other sessions (compiling a document,
writing a summary, re-prefilling a session, reading a session file): written as generators that
yield between chunks, run a chunk at a time between decode steps by the engine loop
(Core.start_job, Core.advance_job), or to their end at once with `finish`."""

from __future__ import annotations

from dataclasses import dataclass

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
