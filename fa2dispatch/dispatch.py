"""The one dispatcher: which backend, with which config, runs a call, and why.

``select`` walks the registered backends in priority order and keeps every rejected
backend's reasons. Decisions are memoized per problem, so a warm call costs one dictionary
lookup. An explicit choice (argument, ``use_backend`` context, ``FA2DISPATCH_BACKEND``) wins;
an explicit choice that cannot run the call raises with that backend's reasons.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field

from fa2dispatch.backends import BACKENDS, Backend, Config
from fa2dispatch.errors import NoBackendError
from fa2dispatch.hardware import DeviceInfo, device_info
from fa2dispatch.problem import AttentionProblem

ENV_BACKEND = "FA2DISPATCH_BACKEND"
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fa2dispatch_backend", default=None)
_MEMO_LIMIT = 4096  # distinct problems remembered; past that the memo starts over
_memo: dict[tuple[AttentionProblem, str], "Decision"] = {}


@dataclass(frozen=True)
class Decision:
    backend: Backend
    config: Config | None
    source: str  # "forced" | "default"
    device: DeviceInfo
    rejected: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        cfg = self.config.short() if self.config is not None else "-"
        lines = [f"backend {self.backend.name} ({self.source}) on {self.device.name} [{self.device.arch}]",
                 f"  config: {cfg}"]
        for name, reasons in self.rejected.items():
            lines.append(f"  not {name}: " + "; ".join(reasons))
        return "\n".join(lines)


def check_backend_name(name: str) -> None:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend={name!r} is not known (known: 'auto', {', '.join(map(repr, BACKENDS))})")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the calls made inside the ``with`` block (``"auto"`` restores dispatch)."""
    check_backend_name(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend(backend: str = "auto") -> str:
    """The choice in force: the argument, else the innermost ``use_backend`` (whose "auto"
    restores automatic choice), else the environment. Resolved once per call, at forward time."""
    if backend != "auto":
        return backend
    ctx = _forced.get()
    if ctx is not None:
        return ctx
    env = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if env != "auto" and env not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={env!r} is not known (known: 'auto', {', '.join(map(repr, BACKENDS))})")
    return env


def select(problem: AttentionProblem, backend: str = "auto") -> Decision:
    """Decide who runs ``problem``. ``backend`` is a registered name or "auto"."""
    return decide(problem, requested_backend(backend))


def decide(problem: AttentionProblem, choice: str) -> Decision:
    """``select`` for an already resolved choice (see ``requested_backend``); memoized."""
    key = (problem, choice)
    decision = _memo.get(key)
    if decision is None:
        decision = _decide(problem, choice)
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
        _memo[key] = decision
    return decision


def clear_memo() -> None:
    """Forget memoized decisions (after registering backends or changing the environment)."""
    _memo.clear()


def _decide(problem: AttentionProblem, choice: str) -> Decision:
    device = device_info(problem.device)
    if choice != "auto":
        check_backend_name(choice)
        chosen = BACKENDS[choice]
        reasons = chosen.not_supported_reasons(problem, device)
        if reasons:
            raise ValueError(f"backend={choice!r} cannot run this call ({problem.describe()}): " + "; ".join(reasons))
        return Decision(chosen, chosen.default_config(problem, device), "forced", device)
    rejected: dict[str, list[str]] = {}
    for name, candidate in BACKENDS.items():
        reasons = candidate.not_supported_reasons(problem, device)
        if reasons:
            rejected[name] = reasons
            continue
        return Decision(candidate, candidate.default_config(problem, device), "default", device, rejected)
    raise NoBackendError(problem.describe(), rejected)
