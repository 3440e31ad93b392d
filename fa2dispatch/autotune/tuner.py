"""The tuning loop: for each bucket of a grid, time every candidate (every capable backend, and
every config of those with a search space), keep the fastest unless it beats the incumbent by
no more than the measured spread, check the winner against the reference, store it.

Inputs per bucket follow BENCH_PROTOCOL.md: 16,384 tokens per batch and a model width of 2,048
(B = 16384 // max(Mq, Mkv), H = 2048 // D), random normal values. The incumbent is the bucket's
existing entry when re-tuning, else the dispatcher's default choice, so a re-run that measures
the same thing keeps the same winner.

Each bucket is stored as soon as it is tuned: an interrupted run resumes where it stopped (a
fresh entry is skipped unless ``force``).

A stale entry whose only change is the kernel sources of some backends (``cache.changed_backends``)
is re-tuned in part: those backends' candidates are all timed again, and every other backend
contributes only its stored pick (the winner, or its ``per_backend`` runner-up), timed again in
the same run. Their slower configs were measured on the same sources and versions, so they are
not timed again, and every timing the winner is chosen from is from this run. The CuPy
candidates are a third of a full re-tune's timings, so a Triton-only change re-tunes in about
two thirds of the time. ``full=True`` (``fa2dispatch autotune --whole``) times everything.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable

import torch

from fa2dispatch import dispatch
from fa2dispatch.backends import BACKENDS
from fa2dispatch.backends.triton_fa2.config import TritonConfig
from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from . import cache
from .buckets import Bucket, bucket_of
from .space import Candidate, candidates
from .timer import Timing
from .verify import verify

TOKENS, HIDDEN = 16384, 2048
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# Buckets the default grid adds to its product, where our kernels are the main contenders:
# GQA 4:1 (cuDNN's adapter refuses H != Hkv) and decode (Mq = 1, causal as FlashAttention-style
# decode calls pass it; bottom-right it masks nothing), at D = 128.
# (mode, dtype, D, causal, Mq, Mkv, group)
DEFAULT_EXTRAS = tuple(
    [(mode, dtype, 128, True, m, m, 4) for mode in ("fwd", "bwd") for dtype in ("float16", "bfloat16")
     for m in (1024, 4096, 16384)]
    + [("fwd", dtype, 128, True, 1, mkv, group) for dtype in ("float16", "bfloat16") for mkv in (4096, 16384)
       for group in (1, 4)]
)


@dataclass(frozen=True)
class Grid:
    """What to tune: every combination of these (``lengths`` are (Mq, Mkv) pairs), then the
    ``extras`` buckets (DEFAULT_EXTRAS for the default grid)."""

    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    head_dims: tuple[int, ...] = (64, 128)
    causal: tuple[bool, ...] = (False, True)
    lengths: tuple[tuple[int, int], ...] = ((1024, 1024), (4096, 4096), (16384, 16384))
    modes: tuple[str, ...] = ("fwd", "bwd")
    groups: tuple[int, ...] = (1,)  # GQA ratios H // Hkv
    # Every fast candidate; the reference (materialized scores, 16 GB at 16k) is the fallback,
    # not a contender.
    backends: tuple[str, ...] = tuple(name for name in BACKENDS if name != "reference")
    level: str = "default"
    extras: tuple[tuple, ...] = DEFAULT_EXTRAS

    def problems(self, device: torch.device) -> list[AttentionProblem]:
        """One problem per bucket, forward buckets first (a backward bucket builds on the
        forward winner of its shape)."""
        out = []
        modes = sorted(self.modes, key=("fwd", "bwd").index)
        for mode, dtype, d, causal, (mq, mkv), group in itertools.product(
                modes, self.dtypes, self.head_dims, self.causal, self.lengths, self.groups):
            out.append(tuning_problem(DTYPES[dtype], d, causal, mq, mkv, mode == "bwd", device, group))
        for mode, dtype, d, causal, mq, mkv, group in sorted(self.extras, key=lambda e: ("fwd", "bwd").index(e[0])):
            if mode in modes:
                out.append(tuning_problem(DTYPES[dtype], d, causal, mq, mkv, mode == "bwd", device, group))
        fwd = [p for p in out if not p.requires_grad]
        return fwd + [p for p in out if p.requires_grad]


def tuning_problem(dtype: torch.dtype, D: int, causal: bool, Mq: int, Mkv: int, backward: bool,
                   device: torch.device, group: int = 1) -> AttentionProblem:
    H = max(group, (HIDDEN // D) // group * group)
    return AttentionProblem(B=max(1, TOKENS // max(Mq, Mkv)), H=H, Hkv=H // group, Mq=Mq, Mkv=Mkv, D=D, dtype=dtype,
                            device=device, layout="bshd", causal=causal, softmax_scale=D**-0.5,
                            requires_grad=backward)


@dataclass
class BucketResult:
    bucket: Bucket
    status: str  # "tuned" | "cached" | "failed"
    entry: dict | None = None
    note: str = ""
    tried: list[dict] = field(default_factory=list)


def _inputs(problem: AttentionProblem, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(heads: int, m: int) -> torch.Tensor:
        return torch.randn(problem.B, m, heads, problem.D, generator=gen).to(problem.device, problem.dtype)

    return rand(problem.H, problem.Mq), rand(problem.Hkv, problem.Mkv), rand(problem.Hkv, problem.Mkv), rand(
        problem.H, problem.Mq)


def _step(problem: AttentionProblem, cand: Candidate, tensors) -> Callable[[], object]:
    backend, config = BACKENDS[cand.backend], cand.config
    q, k, v, dout = tensors
    if not problem.requires_grad:
        return lambda: backend.forward(problem, q, k, v, config)

    def train_step():  # the backend that runs the forward also runs the backward
        out, lse = backend.forward(problem, q, k, v, config)
        return backend.backward(problem, dout, q, k, v, out, lse, config)

    return train_step


def _record(cand: Candidate, timing: Timing | None = None, **extra) -> dict:
    row = {"backend": cand.backend, "config": cand.config.as_dict() if cand.config is not None else None}
    if timing is not None:
        row.update(timing.as_dict())
    row.update(extra)
    return row


def _same(a: Candidate, backend: str, config: dict | None) -> bool:
    return a.backend == backend and (a.config.as_dict() if a.config is not None else None) == config


def _anchors(keep: list[Candidate], search: set[str], incumbent: dict) -> tuple[list[Candidate], set[str]]:
    """A partial re-tune's candidates: every candidate of the ``search`` backends, and for each
    other backend with candidates here its stored pick from ``incumbent`` (the winner or its
    per_backend entry). A backend whose pick is missing or no longer parses is searched whole.
    Returns (candidates, the backends searched)."""
    picks = {name: alt.get("config") for name, alt in (incumbent.get("per_backend") or {}).items()}
    picks[incumbent["backend"]] = incumbent.get("config")
    search = set(search)
    anchors: list[Candidate] = []
    for name in dict.fromkeys(c.backend for c in keep):
        if name in search:
            continue
        try:
            anchors.append(Candidate(name, BACKENDS[name].config_from_dict(picks[name])))
        except (KeyError, TypeError, ValueError):  # never stored (it failed before), or its fields changed
            search.add(name)
    return anchors + [c for c in keep if c.backend in search], search


def tune_problem(problem: AttentionProblem, device: DeviceInfo, timer: Callable[[Callable], Timing], *,
                 backends: tuple[str, ...] = tuple(BACKENDS), level: str = "default", incumbent: dict | None = None,
                 triton_base: TritonConfig | None = None, seed: int = 0,
                 on_candidate: Callable[[Candidate], None] | None = None,
                 verifier: Callable[..., str | None] = verify, search: set[str] | None = None,
                 before_timing: Callable[[AttentionProblem, list[Candidate], int], None] | None = None
                 ) -> BucketResult:
    """Tune one bucket (``problem`` is its representative). Never raises for a candidate's
    failure: it is recorded in ``tried``. ``search`` (with an ``incumbent``): a partial re-tune,
    every candidate of these backends and the incumbent's pick of each other backend (module
    docstring). ``before_timing(problem, candidates, seed)`` runs once before the first timing
    (``precompile.Precompiler.warm``: the candidates compiled ahead in other processes)."""
    bucket = bucket_of(problem)
    keep, pruned = candidates(problem, device, list(backends), level, triton_base)
    default = dispatch.capable_backends(problem, device)[0]
    default_backend = default[0] if default else None
    default_config = BACKENDS[default_backend].default_config(problem, device) if default_backend else None
    default_dict = default_config.as_dict() if default_config is not None else None
    partial = None
    if search is not None and incumbent is not None:
        everything = keep
        keep, searched = _anchors(keep, search, incumbent)
        # the dispatcher's default is timed too: the entry's speed-up is against it
        keep += [c for c in everything if _same(c, default_backend, default_dict) and c not in keep]
        pruned = [(c, reason) for c, reason in pruned if c.backend in searched]
        partial = {"searched": sorted(searched), "picks_timed_again": sorted({c.backend for c in keep} - searched),
                   "previous": incumbent.get("tuned_at")}
    tried = [_record(c, pruned=reason) for c, reason in pruned]
    timings: list[tuple[Candidate, Timing]] = []
    if before_timing is not None and keep:
        before_timing(problem, keep, seed)
    tensors = _inputs(problem, seed)
    try:
        for cand in keep:
            if on_candidate is not None:
                on_candidate(cand)
            try:
                timing = timer(_step(problem, cand, tensors))
            except Exception as exc:  # compile errors, out of resources, a kernel refusing the shape
                tried.append(_record(cand, error=dispatch.error_text(exc)))
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                continue
            timings.append((cand, timing))
            tried.append(_record(cand, timing))
    finally:
        del tensors
    if not timings:
        return BucketResult(bucket, "failed", note="no candidate ran", tried=tried)

    ranked = sorted(timings, key=lambda ct: ct[1].ms)
    base = None
    if incumbent is not None:
        base = next((ct for ct in timings if _same(ct[0], incumbent["backend"], incumbent.get("config"))), None)
    if base is None:
        base = next((ct for ct in timings if _same(ct[0], default_backend, default_dict)), ranked[0])
    default_timing = next((t for c, t in timings if _same(c, default_backend, default_dict)), None)
    best = ranked[0]
    # A challenger must beat the incumbent by more than the noise, so repeated tunes agree.
    winner = best if base[1].ms - best[1].ms > max(best[1].spread, base[1].spread) else base
    for cand, timing in [winner, *(ct for ct in ranked if ct is not winner)]:
        failure = _check(verifier, cand, problem, seed)
        if failure is None:
            entry = _entry(cand, timing, default_backend, default_dict, default_timing, problem, device, tried)
            entry["per_backend"] = _per_backend(ranked, keep, cand, problem, seed, verifier, tried)
            if partial is not None:
                entry["partial"] = partial
            return BucketResult(bucket, "tuned", entry, tried=tried)
        tried.append(_record(cand, timing, rejected=f"failed verification: {failure}"))
    return BucketResult(bucket, "failed", note="no candidate passed verification", tried=tried)


def _check(verifier, cand: Candidate, problem: AttentionProblem, seed: int) -> str | None:
    """The verifier's verdict; a check that itself fails to run is a failed verification."""
    try:
        return verifier(cand.backend, cand.config, problem, seed)
    except Exception as exc:
        return f"verification raised {dispatch.error_text(exc)}"


def _per_backend(ranked, keep: list[Candidate], winner: Candidate, problem: AttentionProblem, seed: int, verifier,
                 tried: list[dict]) -> dict:
    """Each other backend's best verified config: when the winner cannot run a call of this
    bucket (cuDNN and causal Mq != Mkv in the same power-of-two bucket), the dispatcher takes the
    fastest of these that can, and a forced backend runs its own.

    Per backend the same rule as for the winner: its first candidate (its default config, or
    for a backward bucket its tuned forward fields) stays unless another config beats it by
    more than the measured spread of either; a config ahead only by noise would make repeated
    tunes disagree and, measured at 16k on the H100, cost a forced backend 3-5% in the
    benchmark against its default."""
    out: dict[str, dict] = {}
    first = {}
    for cand in keep:
        first.setdefault(cand.backend, cand)
    by_backend: dict[str, list] = {}
    for cand, timing in ranked:
        if cand.backend != winner.backend:
            by_backend.setdefault(cand.backend, []).append((cand, timing))
    for name, options in by_backend.items():
        best = options[0]
        base = next((ct for ct in options if ct[0] == first.get(name)), best)
        pick = best if base[1].ms - best[1].ms > max(best[1].spread, base[1].spread) else base
        for cand, timing in [pick, *(ct for ct in options if ct is not pick)]:
            failure = _check(verifier, cand, problem, seed)
            if failure is None:
                out[name] = {"config": cand.config.as_dict() if cand.config is not None else None,
                             "kernel_hash": cache.kernel_hash(name), **timing.as_dict()}
                break
            tried.append(_record(cand, timing, rejected=f"failed verification: {failure}"))
    return dict(sorted(out.items(), key=lambda item: item[1]["ms"]))


def _entry(cand: Candidate, timing: Timing, default_backend, default_dict, default_timing: Timing | None,
           problem: AttentionProblem, device: DeviceInfo, tried: list[dict]) -> dict:
    return {
        "backend": cand.backend,
        "config": cand.config.as_dict() if cand.config is not None else None,
        "kernel_hash": cache.kernel_hash(cand.backend),
        **timing.as_dict(),
        "default": {"backend": default_backend, "config": default_dict,
                    "ms": round(default_timing.ms, 5) if default_timing else None},
        "speedup_vs_default": round(default_timing.ms / timing.ms, 4) if default_timing else None,
        "verified": True,
        "shape": {f: getattr(problem, f) for f in ("B", "H", "Hkv", "Mq", "Mkv", "D")},
        "versions": cache.soft_stamp(device),
        "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tried": tried,
    }


def _triton_base(problem: AttentionProblem, results: dict[str, dict]) -> TritonConfig | None:
    """For a backward bucket: Triton's tuned forward config of the same shape (the winner's, or
    the Triton runner-up's when another backend won the forward bucket)."""
    entry = results.get(bucket_of(replace(problem, requires_grad=False, return_lse=False)).key) or {}
    if entry.get("backend") == "triton" and entry.get("config"):
        return TritonConfig(**entry["config"])
    runner_up = (entry.get("per_backend") or {}).get("triton") or {}
    return TritonConfig(**runner_up["config"]) if runner_up.get("config") else None


def run(grid: Grid, device: DeviceInfo, timer: Callable[[Callable], Timing], directory, *, force: bool = False,
        full: bool = False, seed: int = 0, on_bucket: Callable[[AttentionProblem, int, int], None] | None = None,
        on_candidate: Callable[[Candidate], None] | None = None,
        on_result: Callable[[BucketResult], None] | None = None,
        verifier: Callable[..., str | None] = verify,
        before_timing: Callable[[AttentionProblem, list[Candidate], int], None] | None = None) -> list[BucketResult]:
    """Tune every bucket of ``grid`` on ``device`` and store each winner in ``directory``. A stale
    entry is re-tuned in part when only kernel sources changed (module docstring), whole with
    ``full`` or ``force``. ``before_timing``: as ``tune_problem``'s, for each bucket tuned."""
    torch_device = torch.device("cuda", device.index) if device.is_gpu else torch.device("cpu")
    problems = grid.problems(torch_device)
    existing = cache.read_entries(device, directory)
    results: list[BucketResult] = []
    unstored = 0
    for i, problem in enumerate(problems):
        if on_bucket is not None:
            on_bucket(problem, i, len(problems))
        bucket = bucket_of(problem)
        old = existing.get(bucket.key)
        if old is not None and not force and cache.is_fresh(old, device):
            result = BucketResult(bucket, "cached", old, note="fresh entry in the cache")
        else:
            search = None if old is None or force or full else cache.changed_backends(old, device, grid.backends)
            result = tune_problem(problem, device, timer, backends=grid.backends, level=grid.level, incumbent=old,
                                  triton_base=_triton_base(problem, existing), seed=seed, on_candidate=on_candidate,
                                  verifier=verifier, search=search, before_timing=before_timing)
            if result.entry is not None:
                try:
                    cache.store(device, {bucket.key: result.entry}, directory)
                except cache.CacheError as exc:  # read-only dir, disk full, another device's file
                    result.note = f"not stored: {exc}"
                    if not unstored:  # once per run: the error text names a new temporary file each time
                        cache.log.warning("fa2dispatch: autotune results not stored: %s (each result notes it)", exc)
                    unstored += 1
                existing[bucket.key] = result.entry
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
