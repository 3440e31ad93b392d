"""``fa2dispatch autotune``: the command line over ``tuner.run``.

``--dry-run`` sizes the search space and runs no kernel (any machine, ``--simulate``
too): per bucket, the candidates kept and pruned per backend with the prune reasons,
and where results would be written. A real run times kernels, so it needs a real
device: a GPU, or the CPU with Triton under its interpreter (which tests the tuner;
its timings say nothing about a GPU). Nothing here imports the Triton kernels: the
interpreter must be chosen before they are.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import Counter
from dataclasses import replace
from typing import NoReturn

import torch
from rich import progress as bars
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fa2dispatch.backends import BACKENDS
from fa2dispatch.hardware import ENV_SIMULATE, current_device
from fa2dispatch.report import resolve_simulation

from . import cache, tuner
from .buckets import bucket_of
from .precompile import Precompiler
from .space import candidates
from .timer import MIN_RUNS, CudaTimer, WallTimer

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DTYPES.update({name: name for name in list(DTYPES.values())})
CAUSAL = {"true": (True,), "false": (False,), "both": (False, True)}
MODES = ("fwd", "bwd")
NOT_STORED = "not stored"  # tuner.run's note on an entry it could not write


# ------------------------------------------------------------------ flag values


def _fail(text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(text)  # argparse prefixes "argument --flag: "


def _items(parse):
    """Argparse type for a comma-separated list; each item parsed, repeats dropped."""

    def parse_list(text: str) -> tuple:
        items = [part.strip() for part in text.split(",")]
        if not all(items):
            _fail(f"{text!r} has an empty item (give a comma-separated list)")
        return tuple(dict.fromkeys(parse(item) for item in items))

    return parse_list


def _one_of(name: str, allowed: dict, known: str = "supported"):
    """Argparse type for one word out of ``allowed`` (case-insensitive), mapped."""

    def parse(item: str):
        if item.lower() not in allowed:
            _fail(f"{name}={item!r} ({known}: {', '.join(allowed)})")
        return allowed[item.lower()]

    return parse


def _head_dim(item: str) -> int:
    # What every backend's head-dim check allows (Backend.head_dim_*); a backend with a
    # narrower range just has no candidate in that bucket.
    if not item.isdecimal() or not (8 <= int(item) <= 256 and int(item) % 8 == 0):
        _fail(f"head_dim={item} (supported: 8..256, multiple of 8)")
    return int(item)


def _length(item: str) -> tuple[int, int]:
    """'4096': Mq = Mkv = 4096; '1x4096': Mq=1, Mkv=4096 (a decode-like bucket)."""
    parts = item.lower().split("x")
    if len(parts) > 2 or not all(p.isdecimal() and int(p) >= 1 for p in parts):
        _fail(f"seqlen={item!r} (supported: a length >= 1, or MqxMkv such as 1x4096)")
    return int(parts[0]), int(parts[-1])


def _group(item: str) -> int:
    if not item.isdecimal() or int(item) < 1:
        _fail(f"group={item!r} (supported: an integer >= 1, query heads per key/value head)")
    return int(item)


def _jobs(text: str) -> int:
    if not text.isdecimal():
        _fail(f"jobs={text} (supported: an integer >= 0, the compiling worker processes)")
    return int(text)


def _runs(text: str) -> int:
    # BENCH_PROTOCOL.md: the median of fewer runs is too noisy to rank configs.
    if not text.isdecimal() or int(text) < MIN_RUNS:
        _fail(f"runs={text} (supported: an integer >= {MIN_RUNS})")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The autotune flags; ``--simulate`` is cli.py's, shared with report and info."""
    level = parser.add_mutually_exclusive_group()
    for flag, text in (("quick", "a handful of configs per kind (a first run)"),
                       ("full", "every plausible config")):
        level.add_argument(f"--{flag}", dest="level", action="store_const", const=flag,
                           help=text)
    parser.set_defaults(level="default", func=lambda args: run_command(args, parser))
    add = parser.add_argument
    add("--dtype", type=_items(_one_of("dtype", DTYPES)),
        help="fp16, bf16, fp32 (default: fp16,bf16)")
    add("--head-dim", type=_items(_head_dim),
        help="multiples of 8 in 8..256 (default: 64,128)")
    add("--seqlen", type=_items(_length),
        help="Mq = Mkv, or MqxMkv like 1x8192 (default: 1024,4096,16384)")
    add("--causal", type=_one_of("causal", CAUSAL), help="true, false, both (default)")
    add("--group", type=_items(_group), help="GQA ratios H/Hkv, e.g. 1,4 (default: 1)")
    add("--mode", type=_items(_one_of("mode", {m: m for m in MODES})),
        help="fwd: no gradients; bwd: forward + backward (default: both)")
    names = {name: name for name in BACKENDS}
    add("--backends", type=_items(_one_of("backend", names, "registered")),
        help="registered names (default: all)")
    add("--runs", type=_runs, default=MIN_RUNS, help=f"timed runs (>= {MIN_RUNS})")
    add("--cache-dir", metavar="PATH", help="write here (default: the user cache dir)")
    add("--force", action="store_true", help="re-tune buckets that have a fresh entry")
    add("--whole", action="store_true",
        help="re-tune stale buckets whole: without it, a bucket stale only because some backends' kernel "
             "sources changed times those backends' candidates and the other backends' stored picks")
    add("--jobs", type=_jobs, default=0, metavar="N",
        help="compile each bucket's candidates ahead in N worker processes before timing them (0: the tuner "
             "compiles as it goes); timings stay in the tuner's process")
    add("--dry-run", action="store_true", help="print the search space; run nothing")


# ------------------------------------------------------------------ the command


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        simulate = resolve_simulation(args.simulate)
    except ValueError as exc:  # a bad FA2DISPATCH_SIMULATE (the flag has choices)
        parser.error(str(exc))
    grid, device = _grid(args), current_device(simulate)
    try:
        directory, no_dir = cache.write_dir(args.cache_dir), None
    except cache.CacheError as exc:
        directory, no_dir = None, str(exc)
    if args.dry_run:
        return dry_run(grid, device, directory, no_dir, args.force, args.whole)
    if simulate is not None:
        source = "--simulate" if args.simulate else ENV_SIMULATE
        parser.error(f"{source}={simulate}: a simulated device cannot be timed "
                     "(add --dry-run to see its search space)")
    timer = _timer(device, args.runs, parser)
    if directory is None:
        parser.error(f"nowhere to store results ({no_dir}): pass --cache-dir PATH")
    return tune(grid, device, timer, directory, args.force, args.whole, args.jobs)


def _grid(args: argparse.Namespace) -> tuner.Grid:
    # Forward first whatever the flag's order: a backward bucket starts from the forward
    # winner of its shape, which must be tuned by then.
    modes = tuple(m for m in MODES if m in args.mode) if args.mode else None
    given = {"dtypes": args.dtype, "head_dims": args.head_dim, "causal": args.causal,
             "lengths": args.seqlen, "modes": modes, "backends": args.backends, "groups": args.group}
    chosen = {field: value for field, value in given.items() if value is not None}
    if any(field != "backends" for field in chosen):
        chosen["extras"] = ()  # a grid named on the command line is exactly that grid
    return replace(tuner.Grid(level=args.level), **chosen)


def _timer(device, runs: int, parser: argparse.ArgumentParser):
    if device.is_gpu:
        return CudaTimer(runs=runs)
    from fa2dispatch.backends.triton_fa2 import _interpreting

    # Triton reads TRITON_INTERPRET as the kernels are decorated: too late to set here.
    if not _interpreting():
        parser.error("no GPU here: run on a GPU, or start with TRITON_INTERPRET=1 to "
                     "tune the Triton interpreter on this CPU (tests the tuner only)")
    return WallTimer(runs=runs)


def dry_run(grid, device, directory, no_dir: str | None, force: bool, full: bool = False) -> int:
    # As tuner.run does; the torch device only places problems, candidates() judges.
    where = torch.device("cuda", device.index) if device.is_gpu else torch.device("cpu")
    problems = grid.problems(where)
    existing = cache.read_entries(device, directory) if directory is not None else {}
    name = device.key + (" (simulated)" if device.simulated else "")
    print(f"autotune --dry-run on {name}: level {grid.level}, "
          f"{_count(len(problems), 'bucket')}, nothing runs")
    kept = pruned_total = skipped = 0
    for problem in problems:
        key = bucket_of(problem).key
        keep, pruned = candidates(problem, device, list(grid.backends), grid.level)
        fresh = not force and key in existing and cache.is_fresh(existing[key], device)
        skipped += fresh
        search = None if fresh or force or full or key not in existing else \
            cache.changed_backends(existing[key], device, grid.backends)
        kept, pruned_total = kept + len(keep), pruned_total + len(pruned)
        print(f"{key} (B={problem.B} H={problem.H} Hkv={problem.Hkv}): "
              f"{len(keep)} to time, {len(pruned)} pruned"
              + (" [fresh in the cache: skipped without --force]" if fresh else "")
              + (f" [stale: partial re-tune, all of {', '.join(sorted(search))} and the other backends' "
                 "stored picks]" if search else ""))
        for line in _backend_lines(grid.backends, keep, pruned):
            print("  " + line)
    skip = f"; {_count(skipped, 'bucket')} fresh in the cache (skipped without --force)"
    print(f"total: {_count(len(problems), 'bucket')}, {kept} candidates to time, "
          f"{pruned_total} pruned" + (skip if skipped else ""))
    if directory is not None:
        print(f"results would be written to {directory / cache.file_name(device)}")
    else:
        print(f"results could not be stored: {no_dir} (pass --cache-dir PATH)")
    return 0


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _backend_lines(backends, keep, pruned) -> list[str]:
    """One line per backend with candidates, its prune reasons below it with counts."""
    kept = Counter(c.backend for c in keep)
    lines, absent = [], []
    for name in backends:
        reasons = Counter(reason for c, reason in pruned if c.backend == name)
        if not kept[name] and not reasons:
            absent.append(name)
            continue
        n_pruned = sum(reasons.values())
        lines.append(f"{name:<22} {kept[name]} to time"
                     + (f", {n_pruned} pruned" if n_pruned else ""))
        lines += [f"    {count} x {reason}" for reason, count in reasons.most_common()]
    if absent:  # the dispatcher refuses them too; `fa2dispatch report` says why
        lines.append(f"{'not capable':<22} {', '.join(absent)}")
    return lines


# ------------------------------------------------------------------ a real run


class _Bars:
    """Rich bars: buckets over the whole run (with ETA), candidates of this bucket."""

    def __init__(self, progress, grid, device):
        self.progress, self.grid, self.device = progress, grid, device
        self.buckets = progress.add_task("buckets", total=None)
        self.cands = progress.add_task("candidates", total=None)
        self.seen = 0

    def on_bucket(self, problem, index: int, total: int) -> None:
        grid, key = self.grid, bucket_of(problem).key
        keep, _ = candidates(problem, self.device, list(grid.backends), grid.level)
        self.progress.update(self.buckets, total=total, completed=index,
                             description=key)
        self.progress.update(self.cands, total=len(keep), completed=0, description="")
        self.seen = 0

    def on_candidate(self, cand) -> None:
        self.progress.update(self.cands, completed=self.seen, description=cand.label())
        self.seen += 1

    def on_result(self, result) -> None:  # also for cached buckets, which time nothing
        done = self.progress.tasks[self.cands].total
        self.progress.update(self.cands, completed=done)
        self.progress.advance(self.buckets)


def tune(grid, device, timer, directory, force: bool, full: bool = False, jobs: int = 0) -> int:
    console = Console()
    console.print(f"autotune on {device.key}: level {grid.level}", markup=False)
    start = time.perf_counter()
    columns = (bars.TextColumn("{task.description}"), bars.BarColumn(),
               bars.MofNCompleteColumn(), bars.TimeRemainingColumn())
    ahead = Precompiler(jobs) if jobs else None
    with bars.Progress(*columns, console=console) as progress, contextlib.closing(ahead) if ahead else contextlib.nullcontext():
        hooks = _Bars(progress, grid, device)
        results = tuner.run(grid, device, timer, directory, force=force, full=full,
                            on_bucket=hooks.on_bucket, on_candidate=hooks.on_candidate,
                            on_result=hooks.on_result, before_timing=ahead.warm if ahead else None)
    console.print(_table(results))
    if ahead is not None:
        console.print(ahead.stats.line(jobs), markup=False)
    tuned = [r for r in results if r.status == "tuned"]
    speedups = [r.entry["speedup_vs_default"] for r in tuned
                if r.entry.get("speedup_vs_default") is not None]
    if speedups:
        median, best = statistics.median(speedups), max(speedups)
        over = _count(len(speedups), "tuned bucket")
        console.print(f"speed-up over the default, {over}: median {median:.2f}x, "
                      f"best {best:.2f}x")
    written = sum(not r.note.startswith(NOT_STORED) for r in tuned)
    path = directory / cache.file_name(device)
    entries = _count(written, "entry", "entries")
    console.print(f"cache file: {path} ({entries} written)" if written
                  else f"cache file: nothing written to {path}", markup=False)
    console.print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 1 if any(r.status == "failed" for r in results) else 0


def _table(results) -> Table:
    table = Table(title="autotune results")
    for col in ("bucket", "status", "winner", "ms", "default ms", "speed-up", "note"):
        table.add_column(col, overflow="fold")
    for r in results:
        e = r.entry or {}
        speedup = e.get("speedup_vs_default")
        config = _short(r.bucket.mode, e.get("config"))
        winner = f"{e['backend']} {config}" if e else "-"
        cells = (r.bucket.key, r.status, winner.strip(), _ms(e.get("ms")),
                 _ms((e.get("default") or {}).get("ms")),
                 f"{speedup:.2f}x" if speedup is not None else "-", r.note)
        table.add_row(*map(escape, cells))  # notes quote errors, which may hold [...]
    return table


def _ms(value) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _short(mode: str, c: dict | None) -> str:
    """The fields a bucket's search varies: forward blocks (fwd), backward (bwd)."""
    if not c or "num_stages" not in c:  # no config, or not a TritonConfig (a CupyConfig: its set fields)
        return " ".join(f"{k}={v}" for k, v in (c or {}).items() if v not in (None, 0))
    text = (f"{c['block_m']}x{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
            if mode == "fwd" else
            f"dkdv {c['dkdv_block_m']}x{c['dkdv_block_n']} dq {c['dq_block_m']}x"
            f"{c['dq_block_n']} w{c['bwd_num_warps']}"
            + (f"/dkdv w{c['dkdv_num_warps']}" if c.get('dkdv_num_warps') else "") + f" s{c['bwd_num_stages']}")
    amd = {"waves_per_eu": "wpe", "matrix_instr_nonkdim": "mfma", "kpack": "kpack"}
    return text + "".join(f" {short}{c[k]}" for k, short in amd.items() if c.get(k))
