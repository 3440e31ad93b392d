"""The one dispatcher: which backend, with which config, runs a call, and why.

``select`` walks the registered backends in the device family's priority order
(``backends.PRIORITY``) and keeps every rejected backend's reasons. Decisions are memoized per
problem (a finer key than the autotune bucket: exact sizes decide limits such as the launch
grid), so a warm call costs one dictionary lookup. An explicit choice (argument,
``use_backend`` context, ``FA2DISPATCH_BACKEND``) wins; an explicit choice that cannot run the
call raises ``ValueError`` with that backend's reasons.

Fallback: when the chosen backend fails to compile or launch on a valid call, ``run_decision``
and ``run_backward`` (the only places a backend is invoked, in ``ops.py``) call
``record_failure``: the next candidate takes over, the memo remembers it, a warning is logged
once per backend, and ``failures()`` keeps the record for the report. Invalid input never gets
here: it raises in validation. A forced backend that fails raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
from dataclasses import dataclass, field

import torch

from fa2dispatch.backends import BACKENDS, Backend, Config, priority
from fa2dispatch.errors import NoBackendError
from fa2dispatch.hardware import DeviceInfo, dispatch_device, simulation
from fa2dispatch.problem import AttentionProblem

log = logging.getLogger("fa2dispatch")

ENV_BACKEND = "FA2DISPATCH_BACKEND"
ENV_AUTOTUNE = "FA2DISPATCH_AUTOTUNE"  # "1": tune a call's missing bucket once, inside the call
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fa2dispatch_backend", default=None)
_MEMO_LIMIT = 4096  # distinct problems remembered; past that the memo starts over
_memo: dict[tuple, "Decision"] = {}
# The API's per-call memo: call signature + choice -> (problem, choice, decision); see api._prepare.
call_memo: dict[tuple, tuple] = {}
_FAILURE_LIMIT = 100  # run-time failures kept for the report
_failures: list["Failure"] = []
_warned: set[tuple[str, str]] = set()
_lock = threading.Lock()  # guards _failures/_warned; the memo is a plain dict (atomic get/set)


@dataclass(frozen=True)
class Failure:
    """A backend that failed at run time on a valid call, and who took over."""

    backend: str
    phase: str  # "forward" | "backward"
    error: str  # "ExceptionType: message" (first line)
    problem: str  # AttentionProblem.describe()
    device: str
    replaced_by: str | None  # the backend that ran instead; None if the error was raised


@dataclass(frozen=True)
class Decision:
    """Who runs a call and why. ``str()`` is the text ``fa2dispatch.explain`` users read."""

    backend: Backend
    config: Config | None
    source: str  # "forced" | "tuned" | "default" | "fallback"
    device: DeviceInfo
    problem: AttentionProblem
    rejected: dict[str, list[str]] = field(default_factory=dict)  # every backend not chosen, with reasons
    fallbacks: tuple[str, ...] = ()  # the other backends that can run the call, in order
    tuned_from: str | None = None  # the cache entry behind a "tuned" decision
    note: str | None = None  # how the call reached this problem (a uniform varlen pack run as dense, ...)

    SOURCES = {
        "forced": "forced by backend= / use_backend / FA2DISPATCH_BACKEND",
        "tuned": "winner in the autotune cache",
        "default": "first capable backend in the device's priority order, default config",
        "fallback": "the preferred backend failed at run time; next capable backend",
    }

    def __str__(self) -> str:
        sim = " (simulated)" if self.device.simulated else ""
        lines = [
            f"fa2dispatch runs {self.problem.describe()}",
            f"  on      {self.device.name} [{self.device.arch}]{sim}",
            f"  with    {self.backend.name}  ({self.source}: {self.SOURCES[self.source]})",
            f"  config  {self.config.short() if self.config is not None else '-'}",
        ]
        if self.note:
            lines.append(f"  note    {self.note}")
        if self.tuned_from:
            lines.append(f"  tuned   {self.tuned_from}")
        if self.fallbacks:
            lines.append(f"  then    {', '.join(self.fallbacks)}  (if it fails at run time)")
        if self.rejected:
            lines.append("  not chosen:")
            width = max(map(len, self.rejected))
            for name, reasons in self.rejected.items():
                lines.append(f"    {name:<{width}}  " + "; ".join(reasons))
        return "\n".join(lines)


def known_backends() -> str:
    return ", ".join(map(repr, ("auto", *BACKENDS)))


def check_backend_name(name: str, source: str = "backend") -> None:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"{source}={name!r} is not known (known: {known_backends()})")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the calls made inside the ``with`` block (``"auto"`` restores dispatch)."""
    check_backend_name(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


# use_backend("auto") inside a process with FA2DISPATCH_BACKEND set: automatic choice, ignoring
# the environment. Plain "auto" lets the environment decide when the decision is made.
AUTO_IGNORING_ENV = "auto:ignore-env"


def requested_backend(backend: str = "auto") -> str:
    """The explicit choice in force: the argument, else the innermost ``use_backend`` block.
    Resolved once per call, at forward time (so the backward runs where the forward ran).

    Environment variables (``FA2DISPATCH_BACKEND``, ``FA2DISPATCH_SIMULATE``) are read when a
    decision is made, not per call: the warm path stays a dictionary lookup. After changing
    them inside a running process, call ``clear_memo()``."""
    if backend != "auto":
        return backend
    ctx = _forced.get()
    if ctx is None:
        return "auto"
    return AUTO_IGNORING_ENV if ctx == "auto" else ctx


def environment_backend() -> str:
    """``FA2DISPATCH_BACKEND`` (validated), "auto" when unset."""
    env = os.environ.get(ENV_BACKEND) or "auto"
    if env != "auto":
        check_backend_name(env, ENV_BACKEND)
    return env


def select(problem: AttentionProblem, backend: str = "auto", *, device: DeviceInfo | None = None) -> Decision:
    """Decide who runs ``problem``: ``backend`` is a registered name or "auto"; ``device``
    overrides the problem's device (a simulated profile, ``hardware.simulated_device``)."""
    check_backend_name(backend)
    choice = requested_backend(backend)
    if device is not None:
        return _decide(problem, choice, device)
    return decide(problem, choice)


def decide(problem: AttentionProblem, choice: str) -> Decision:
    """``select`` for an already resolved choice (see ``requested_backend``); memoized."""
    key = (problem, choice)
    decision = _memo.get(key)
    if decision is None:
        decision = _decide(problem, choice, dispatch_device(problem.device, simulation()))
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
        _memo[key] = decision
    return decision


def clear_memo() -> None:
    """Forget memoized decisions (after registering backends or changing the environment)."""
    _memo.clear()
    call_memo.clear()


def remember_call(key: tuple, prepared: tuple) -> None:
    if len(call_memo) >= _MEMO_LIMIT:
        call_memo.clear()
    call_memo[key] = prepared


def _reasons(backend: Backend, problem: AttentionProblem, device: DeviceInfo) -> list[str]:
    """The backend's reasons; a check that itself fails (a broken driver or library) is one
    more reason, so one broken backend never blocks the others."""
    try:
        return backend.not_supported_reasons(problem, device)
    except Exception as exc:
        return [f"its capability check failed ({error_text(exc)})"]


def effective_choice(choice: str) -> str:
    """A requested choice with the environment applied: a backend name, or "auto"."""
    if choice == "auto":
        return environment_backend()
    return "auto" if choice == AUTO_IGNORING_ENV else choice


def _decide(problem: AttentionProblem, choice: str, device: DeviceInfo) -> Decision:
    choice = effective_choice(choice)
    if choice != "auto":
        check_backend_name(choice)
        chosen = BACKENDS[choice]
        reasons = _reasons(chosen, problem, device)
        if reasons:
            raise ValueError(f"backend={choice!r} cannot run this call ({problem.describe()}): " + "; ".join(reasons))
        config, where = _tuned_config_of(chosen, problem, device)
        return Decision(chosen, config, "forced", device, problem, tuned_from=where)
    capable, rejected = capable_backends(problem, device)
    if not capable:
        raise NoBackendError(f"{problem.describe()} on {device.name} [{device.arch}]", rejected)
    tuned = _tuned(problem, device, capable, rejected)
    if tuned is not None:
        return tuned
    chosen = BACKENDS[capable[0]]
    return Decision(chosen, chosen.default_config(problem, device), "default", device, problem,
                    rejected, tuple(capable[1:]))


def capable_backends(problem: AttentionProblem, device: DeviceInfo) -> tuple[list[str], dict[str, list[str]]]:
    """(backends that can run the problem, in priority order; every other one with its reasons)."""
    rejected: dict[str, list[str]] = {}
    capable: list[str] = []
    for name in priority(device):
        reasons = _reasons(BACKENDS[name], problem, device)
        if reasons:
            rejected[name] = reasons
        else:
            capable.append(name)
    return capable, rejected


def _tuned(problem: AttentionProblem, device: DeviceInfo, capable: list[str],
           rejected: dict[str, list[str]]) -> Decision | None:
    """The autotune cache's winner for the problem's bucket (or the nearest of its kind), if
    that backend can run this call with that config. The cache never breaks a call."""
    from fa2dispatch.autotune import cache

    try:
        entry, exact = cache.lookup(device, problem)
        if not exact and os.environ.get(ENV_AUTOTUNE) == "1" and _may_tune_now(device):
            entry, exact = _tune_now(problem, device)
        if entry is None:
            return None
        # the bucket's winner, else the fastest other backend tuned there that can run this call
        options = [(entry.backend, entry.config, "")]
        options += [(name, config, f" (runner-up: {entry.backend} cannot run this call)")
                    for name, config, _ in entry.alternatives]
        for name, config_dict, note in options:
            if name not in capable:
                continue
            backend = BACKENDS[name]
            config = backend.config_from_dict(config_dict)
            if not backend.config_reasons(problem, device, config):
                break
        else:
            return None
    except Exception as exc:  # damaged entries are reported by the cache; anything else here too
        cache.warn_once(f"autotune cache lookup failed ({error_text(exc)}); using the default choice")
        return None
    where = entry.source + ("" if exact else " (nearest tuned bucket)") + note
    return Decision(backend, config, "tuned", device, problem, rejected,
                    tuple(n for n in capable if n != backend.name), tuned_from=where)


def _tuned_config_of(backend: Backend, problem: AttentionProblem, device: DeviceInfo) -> tuple[Config | None, str | None]:
    """A forced backend's config: its tuned one from the problem's bucket (the winner's or its
    runner-up entry there) when the cache has one that fits this call, else its default. The
    user chose the kernel; the tuner still chose its tiles."""
    from fa2dispatch.autotune import cache

    default = backend.default_config(problem, device)
    if backend.config_type is None:
        return default, None
    try:
        entry, exact = cache.lookup(device, problem)
        if entry is None:
            return default, None
        options = [(entry.backend, entry.config)] + [(n, c) for n, c, _ in entry.alternatives]
        for name, config_dict in options:
            if name == backend.name:
                config = backend.config_from_dict(config_dict)
                if backend.config_reasons(problem, device, config):
                    return default, None
                return config, entry.source + ("" if exact else " (nearest tuned bucket)") + f" ({name}'s tuned config)"
    except Exception as exc:  # the cache never breaks a call
        cache.warn_once(f"autotune cache lookup failed ({error_text(exc)}); using the default config")
    return default, None


def _may_tune_now(device: DeviceInfo) -> bool:
    """Tuning inside a call needs a real GPU and must not happen during CUDA graph capture."""
    return device.is_gpu and not device.simulated and not torch.cuda.is_current_stream_capturing()


def _tune_now(problem: AttentionProblem, device: DeviceInfo):
    """FA2DISPATCH_AUTOTUNE=1: tune this problem's bucket once, store it, look it up again."""
    from fa2dispatch.autotune import cache, tuner
    from fa2dispatch.autotune.buckets import bucket_of
    from fa2dispatch.autotune.timer import CudaTimer

    log.warning("fa2dispatch: FA2DISPATCH_AUTOTUNE=1: tuning %s (once; stored in the autotune cache)",
                bucket_of(problem).key)
    result = tuner.tune_problem(problem, device, CudaTimer())
    if result.entry is None:
        cache.warn_once(f"autotuning {result.bucket.key} failed ({result.note}); using the default choice")
        return None, False
    cache.store(device, {result.bucket.key: result.entry}, cache.write_dir())
    return cache.lookup(device, problem)


# ------------------------------------------------------------------ run-time failures


def error_text(exc: BaseException) -> str:
    """One line for a report or a reason: "Type: first line of the message" (300 chars at most).
    A Triton compile error's first line is only its location ("at 12:4:"); its last line says
    why, so that is appended."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if re.fullmatch(r"at \d+:\d+:", first) and len(lines) > 1:
        first = f"{first} {lines[-1]}"
    first = first[:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def may_fall_back(decision: Decision, exc: Exception) -> bool:
    """A failure on a valid call falls back unless the backend was forced or memory ran out
    (the next candidate would need more of it, not less)."""
    return decision.source != "forced" and not isinstance(exc, torch.cuda.OutOfMemoryError)


def record_failure(decision: Decision, choice: str, phase: str, exc: Exception,
                   needs_foreign_lse: bool = False) -> Decision | None:
    """``decision.backend`` failed on ``phase``; return the decision that replaces it, or None
    when nothing can (the caller re-raises). The memo is updated so later calls skip the
    failing backend for this problem."""
    problem, device = decision.problem, decision.device
    error = error_text(exc)
    remaining = [n for n in decision.fallbacks
                 if not (needs_foreign_lse and BACKENDS[n].backward_needs_own_forward)
                 and not (phase == "backward" and not BACKENDS[n].supports_backward)]
    replacement = None
    if remaining and may_fall_back(decision, exc):
        nxt = BACKENDS[remaining[0]]
        rejected = dict(decision.rejected)
        rejected[decision.backend.name] = [f"failed at run time ({phase}): {error}"]
        replacement = Decision(nxt, nxt.default_config(problem, device), "fallback", device, problem,
                               rejected, tuple(n for n in decision.fallbacks if n != nxt.name))
        _memo[(problem, choice)] = replacement
        call_memo.clear()  # calls of this problem must see the replacement
    with _lock:
        if len(_failures) >= _FAILURE_LIMIT:
            del _failures[0]
        _failures.append(Failure(decision.backend.name, phase, error, problem.describe(), device.key,
                                 replacement.backend.name if replacement else None))
        first = (decision.backend.name, phase) not in _warned
        _warned.add((decision.backend.name, phase))
    if replacement is None and hasattr(exc, "add_note"):
        why = ("it was forced (backend=, use_backend or FA2DISPATCH_BACKEND)" if decision.source == "forced"
               else "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError)
               else "no other capable backend is left")
        exc.add_note(f"fa2dispatch: backend {decision.backend.name!r} failed in the {phase} of "
                     f"{problem.describe()} on {device.key}; nothing took over: {why}")
    if replacement is not None and first:
        log.warning("fa2dispatch: backend %s failed in the %s (%s); %s runs instead for this call kind. "
                    "fa2dispatch.dispatch.failures() and `fa2dispatch report` list every failure.",
                    decision.backend.name, phase, error, replacement.backend.name)
    return replacement


def failures() -> list[Failure]:
    """Run-time failures seen in this process (most recent last, at most 100)."""
    with _lock:
        return list(_failures)


def clear_failures() -> None:
    with _lock:
        _failures.clear()
        _warned.clear()

