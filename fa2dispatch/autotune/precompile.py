"""Compiling a bucket's candidates ahead, in parallel: ``fa2dispatch autotune --jobs N``.

Most of a re-tune is compiling: on the H100 (session 13) a forward bucket took 13-20 s for about
14 candidates whose timed runs add up to under a second. Triton (and CuPy) keep what they compile
in an on-disk cache, so a kernel compiled in one process loads in another in milliseconds.

``Precompiler.warm`` runs each of a bucket's candidates once, spread over N spawned worker
processes, before the tuner times them; the tuner's own first call of each then loads the
kernel from the disk cache instead of compiling it. The workers run nothing while the tuner
times (``warm`` returns first), and every timing is the tuner's, in its own process.

Best effort: a candidate that fails in a worker is left to the tuner (which records its error as
always), and a bucket whose warm-up passes ``timeout`` seconds has its workers terminated and
restarted for the next bucket; the tuner then compiles what is missing itself.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field

import torch

from fa2dispatch.problem import AttentionProblem

from .space import Candidate

DEFAULT_TIMEOUT = 300.0


def _run_candidates(problem: AttentionProblem, cands: list[Candidate], seed: int) -> tuple[int, list[str]]:
    """In a worker: run each candidate once on the tuner's inputs for the bucket (so that
    every kernel is compiled with the same specialization the tuner's call will ask for).
    Returns (how many ran, the errors of those that did not)."""
    from fa2dispatch import dispatch

    from .tuner import _inputs, _step

    if problem.device.type == "cuda" and problem.device.index is not None:
        torch.cuda.set_device(problem.device)
    tensors = _inputs(problem, seed)
    ran, errors = 0, []
    for cand in cands:
        try:
            _step(problem, cand, tensors)()
            if problem.device.type == "cuda":
                torch.cuda.synchronize(problem.device)
            ran += 1
        except Exception as exc:  # the tuner meets the same failure and records it
            errors.append(f"{cand.label()}: {dispatch.error_text(exc)}")
    return ran, errors


@dataclass
class Stats:
    buckets: int = 0
    ran: int = 0
    failed: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few, for the log

    def line(self, jobs: int) -> str:
        return (f"compiled ahead ({jobs} workers): {self.ran} candidates ran in {self.buckets} buckets, "
                f"{self.seconds:.1f} s; {self.failed} failed or unfinished there (left to the tuner), {self.timeouts} "
                f"bucket(s) past the timeout" + "".join(f"\n  {e}" for e in self.errors))


class Precompiler:
    """A pool of ``jobs`` spawned workers, started on the first ``warm`` and kept across
    buckets (each worker pays for importing torch and a CUDA context once). ``close`` ends
    them (``contextlib.closing``)."""

    def __init__(self, jobs: int, timeout: float = DEFAULT_TIMEOUT):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs={jobs!r}: expected an int >= 1")
        if not timeout > 0:
            raise ValueError(f"timeout={timeout!r}: expected seconds > 0")
        self.jobs, self.timeout = jobs, timeout
        self.stats = Stats()
        self._pool = None

    def warm(self, problem: AttentionProblem, cands: list[Candidate], seed: int = 0) -> None:
        """Run every candidate once in the workers, round-robin (candidates of one backend
        spread over all of them); return when all are done or ``timeout`` has passed."""
        if not cands:
            return
        start = time.perf_counter()
        chunks = [cands[i::self.jobs] for i in range(min(self.jobs, len(cands)))]
        ran = failed = 0
        try:
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(self.jobs)
            pending = [self._pool.apply_async(_run_candidates, (problem, chunk, seed)) for chunk in chunks]
            deadline = start + self.timeout
            for result in pending:
                done, errors = result.get(timeout=max(0.0, deadline - time.perf_counter()))
                ran += done
                failed += len(errors)
                self._note(errors)
        except multiprocessing.TimeoutError:
            self.stats.timeouts += 1
            failed = len(cands) - ran
            self._terminate()
        except Exception as exc:  # a worker that could not start or unpickle: the tuner compiles alone
            failed = len(cands) - ran
            self._note([f"the pool: {type(exc).__name__}: {exc}"])
            self._terminate()
        finally:
            self.stats.buckets += 1
            self.stats.ran += ran
            self.stats.failed += failed
            self.stats.seconds += time.perf_counter() - start

    def _note(self, errors: list[str]) -> None:
        self.stats.errors.extend(errors[:max(0, 5 - len(self.stats.errors))])

    def _terminate(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
