"""The autotuner on CPU: search spaces and pruning, the cache on disk (round trip, mismatches,
damage, read-only, concurrent writers), the tuning loop with an injected deterministic timer,
resume after an interruption, and one real tuning run under the Triton interpreter."""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fa2dispatch import dispatch
from fa2dispatch.autotune import cache, space, tuner
from fa2dispatch.autotune.buckets import bucket_of
from fa2dispatch.autotune.timer import Timing, WallTimer, summarize
from fa2dispatch.backends.triton_fa2.config import TritonConfig
from fa2dispatch.hardware import device_info, simulated_device
from fa2dispatch.problem import AttentionProblem

H100 = simulated_device("h100")


def problem(**overrides) -> AttentionProblem:
    fields = dict(B=4, H=16, Hkv=16, Mq=4096, Mkv=4096, D=128, dtype=torch.float16, device=torch.device("cpu"),
                  layout="bshd", causal=False, softmax_scale=128**-0.5)
    return AttentionProblem(**{**fields, **overrides})


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    user = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(user))
    monkeypatch.setattr(cache, "shipped_dir", lambda: tmp_path / "shipped")
    cache.reload()
    dispatch.clear_memo()
    yield user
    cache.reload()
    dispatch.clear_memo()


# ------------------------------------------------------------------ search spaces and pruning


def test_default_config_comes_first_and_is_never_pruned():
    for name in ("h100", "a100", "rtx4090", "mi300x", "mi250x"):
        device = simulated_device(name)
        for p in (problem(), problem(D=256), problem(requires_grad=True, D=256)):
            keep, _ = space.candidates(p, device, ["triton"], "full")
            assert keep[0] == space.Candidate("triton", device and space.BACKENDS["triton"].default_config(p, device))


def test_candidates_cover_every_capable_backend_and_only_those():
    keep, _ = space.candidates(problem(), H100, list(space.BACKENDS), "quick")
    assert {c.backend for c in keep} == {"triton", "torch-sdpa-cudnn", "torch-sdpa-flash", "torch-sdpa-efficient",
                                         "reference"}
    keep, _ = space.candidates(problem(D=256, H=16, Hkv=4), H100, list(space.BACKENDS), "quick")
    assert {c.backend for c in keep} == {"triton", "torch-sdpa-flash", "reference"}  # cuDNN: D<=128, no GQA


def test_levels_grow_and_unknown_levels_are_refused():
    sizes = [len(space.candidates(problem(), H100, ["triton"], level)[0]) for level in space.LEVELS]
    assert sizes[0] < sizes[1] < sizes[2]
    with pytest.raises(ValueError, match=r"level='huge' \(supported: quick, default, full\)"):
        space.candidates(problem(), H100, ["triton"], "huge")


@pytest.mark.parametrize(
    "device, changes, backward, reason",
    [
        (H100, dict(block_m=48), False, "block_m=48 (supported: a power of two >= 16, tl.dot's smallest tile)"),
        (H100, dict(dq_block_n=8), True, "dq_block_n=8 (supported: a power of two >= 16, tl.dot's smallest tile)"),
        (H100, dict(block_m=64, num_warps=8), False, "8 warps need >= 128 query rows, got block_m=64"),
        (H100, dict(block_m=64, block_n=64, num_warps=12, fwd_kernel="gluon-pp"), False,
         "8 consumer warps need >= 128 query rows, got block_m=64"),  # the producer warpgroup does not count
        (simulated_device("mi300x"), dict(num_stages=3), False, "num_stages=3 (supported on AMD: 1-2)"),
        (simulated_device("rtx4090"), dict(block_n=128), False,
         "needs ~128 KiB of shared memory (device: 99 KiB per block)"),
        (simulated_device("mi300x"), dict(dkdv_block_m=128, dq_block_n=128), True,
         "needs ~128 KiB of shared memory (device: 64 KiB per block)"),
    ],
    ids=["pow2", "pow2-bwd", "warps", "warps-pingpong", "amd-stages", "smem-ada", "smem-amd-bwd"],
)
def test_prune_reasons(device, changes, backward, reason):
    p = problem(D=256, requires_grad=backward)
    config = replace(TritonConfig(), **changes)
    assert space.triton_prune_reason(p, device, config, backward) == reason


def test_smem_bound_matches_a_measured_compile():
    """The H100 forward at D=128, 128 x 128 blocks, 3 stages compiles to 64 KiB (docs/PERF_NOTES.md):
    the lower bound must not exceed what the compiler needed."""
    config = TritonConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)
    assert space.smem_bytes(problem(), config, backward=False) == 64 * 1024


# ------------------------------------------------------------------ cache on disk


def _entry(backend="triton", config=None, device=H100, **extra) -> dict:
    config = config if config is not None or backend != "triton" else TritonConfig().as_dict()
    return {"backend": backend, "config": config, "ms": 1.0, "versions": cache.soft_stamp(device),
            "kernel_hash": cache.kernel_hash(backend), **extra}


def test_round_trip_store_read_lookup(isolated_cache):
    key = bucket_of(problem()).key
    config = TritonConfig(block_m=64).as_dict()
    path = cache.store(H100, {key: _entry(config=config)}, isolated_cache)
    assert path == isolated_cache / cache.file_name(H100)
    data = json.loads(path.read_text())
    assert data["schema"] == cache.SCHEMA and data["device_key"] == cache.device_key(H100)
    assert cache.read_entries(H100, isolated_cache)[key]["config"] == config
    decision = dispatch.select(problem(), device=H100)
    assert (decision.source, decision.config) == ("tuned", TritonConfig(block_m=64))
    # a second store merges, it does not replace
    cache.store(H100, {bucket_of(problem(D=64)).key: _entry()}, isolated_cache)
    assert set(cache.read_entries(H100, isolated_cache)) == {key, bucket_of(problem(D=64)).key}
    assert not [p for p in isolated_cache.iterdir() if p.suffix == ".tmp"]


def test_hard_mismatch_is_never_overwritten(isolated_cache):
    isolated_cache.mkdir()
    path = isolated_cache / cache.file_name(H100)
    foreign = {"schema": cache.SCHEMA, "device_key": {**cache.device_key(H100), "name": "NVIDIA H200"},
               "entries": {"x": 1}}
    path.write_text(json.dumps(foreign))
    with pytest.raises(cache.CacheError, match="belongs to another device .*not overwritten"):
        cache.store(H100, {bucket_of(problem()).key: _entry()}, isolated_cache)
    assert json.loads(path.read_text()) == foreign
    assert cache.read_entries(H100, isolated_cache) == {}


def test_soft_mismatch_marks_entries_stale_and_rewrites_the_header(isolated_cache):
    key = bucket_of(problem()).key
    old = _entry(versions={**cache.soft_stamp(H100), "torch": "2.0.0"})
    assert not cache.is_fresh(old, H100) and cache.is_fresh(_entry(), H100)
    cache.store(H100, {key: old}, isolated_cache)
    assert dispatch.select(problem(), device=H100).source == "tuned"  # stale entries still serve


def test_damaged_file_is_replaced_on_write(isolated_cache, caplog):
    isolated_cache.mkdir()
    path = isolated_cache / cache.file_name(H100)
    path.write_text("{ not json")
    assert cache.read_entries(H100, isolated_cache) == {}
    cache.store(H100, {bucket_of(problem()).key: _entry()}, isolated_cache)
    assert len(json.loads(path.read_text())["entries"]) == 1
    assert any("replacing a damaged autotune cache file" in r.message for r in caplog.records)


def _deny_writes(directory: Path, monkeypatch) -> None:
    """Make ``directory`` read-only; as root (where chmod does not stop writes) make the write
    itself fail the way a read-only mount does."""
    directory.mkdir(exist_ok=True)
    directory.chmod(0o500)
    probe = directory / "probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return
    probe.unlink()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied (read-only directory)", str(directory))

    monkeypatch.setattr("tempfile.mkstemp", read_only)


def test_read_only_cache_dir_still_serves_and_writes_fail_cleanly(isolated_cache, monkeypatch):
    key = bucket_of(problem()).key
    cache.store(H100, {key: _entry(config=TritonConfig(block_m=64).as_dict())}, isolated_cache)
    _deny_writes(isolated_cache, monkeypatch)
    try:
        assert dispatch.select(problem(), device=H100).source == "tuned"
        with pytest.raises(cache.CacheError, match="cannot write .*PermissionError"):
            cache.store(H100, {bucket_of(problem(D=64)).key: _entry()}, isolated_cache)
        assert list(cache.read_entries(H100, isolated_cache)) == [key]
    finally:
        isolated_cache.chmod(0o700)


def _writer(args) -> None:
    directory, worker, count = args
    from fa2dispatch.autotune import cache as worker_cache
    from fa2dispatch.hardware import simulated_device as sim

    device = sim("h100")
    for i in range(count):
        worker_cache.store(device, {f"fwd/float16/d64/full/g1/q{worker}/k{i}": {"backend": "triton", "config": None}},
                           Path(directory))


def test_eight_concurrent_writers_lose_nothing(isolated_cache):
    isolated_cache.mkdir()
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pool.map(_writer, [(str(isolated_cache), w, 5) for w in range(8)])
    data = json.loads((isolated_cache / cache.file_name(H100)).read_text())
    assert len(data["entries"]) == 40
    assert not [p for p in isolated_cache.iterdir() if p.suffix == ".tmp"]


# ------------------------------------------------------------------ the tuning loop


class ScriptedTimer:
    """Deterministic timings by candidate label (the tuner announces each candidate before
    timing it); a label mapped to an exception raises it, as a failing compile would."""

    def __init__(self, script: dict[str, float | Exception], spread: float = 0.01, default: float = 5.0):
        self.script, self.spread, self.default = script, spread, default
        self.current: space.Candidate | None = None
        self.calls: list[str] = []

    def announce(self, cand: space.Candidate) -> None:
        self.current = cand

    def __call__(self, fn) -> Timing:
        label = self.current.label()
        self.calls.append(label)
        value = next((v for k, v in self.script.items() if label.startswith(k)), self.default)
        if isinstance(value, Exception):
            raise value
        return Timing(value, self.spread, 20)


def _cpu():
    return device_info(torch.device("cpu"))


def _tune(timer: ScriptedTimer, p=None, verifier=lambda *a: None, **kwargs):
    p = p or problem(B=1, H=2, Hkv=2, Mq=16, Mkv=16, D=16)
    return tuner.tune_problem(p, _cpu(), timer, backends=("reference", "triton"), on_candidate=timer.announce,
                              verifier=verifier, **kwargs)


def test_fastest_candidate_wins_and_everything_is_recorded():
    timer = ScriptedTimer({"reference": 3.0, "triton block_m=32 block_n=16": 2.0, "triton block_m=16": 1.0})
    result = _tune(timer)
    assert result.status == "tuned"
    assert result.entry["backend"] == "triton" and result.entry["config"]["block_m"] == 16
    assert result.entry["default"]["backend"] == "reference" and result.entry["speedup_vs_default"] == 3.0
    assert [t["ms"] for t in result.entry["tried"]] == [3.0, 2.0, 1.0]
    assert result.entry["verified"] is True and result.entry["versions"] == cache.soft_stamp(_cpu())


def test_a_challenger_within_the_spread_does_not_unseat_the_incumbent():
    """The default (reference) is the incumbent: 2.95 vs 3.0 with a spread of 0.1 is noise."""
    timer = ScriptedTimer({"reference": 3.0, "triton": 2.95}, spread=0.1)
    assert _tune(timer).entry["backend"] == "reference"
    timer = ScriptedTimer({"reference": 3.0, "triton": 2.85}, spread=0.1)
    assert _tune(timer).entry["backend"] == "triton"


def test_repeated_tunes_with_an_incumbent_agree():
    first = _tune(ScriptedTimer({"reference": 3.0, "triton block_m=32": 1.0, "triton block_m=16": 1.02}, spread=0.05))
    winner = first.entry
    # the next run measures the other config marginally faster: within the spread, no flip
    again = _tune(ScriptedTimer({"reference": 3.0, "triton block_m=32": 1.01, "triton block_m=16": 0.99},
                                spread=0.05), incumbent=winner)
    assert (again.entry["backend"], again.entry["config"]) == (winner["backend"], winner["config"])


def test_failing_candidates_are_recorded_not_fatal():
    timer = ScriptedTimer({"triton block_m=32": RuntimeError("out of resources: shared memory, Required: 300000"),
                           "reference": 2.0, "triton block_m=16": 1.0})
    result = _tune(timer)
    assert result.entry["backend"] == "triton" and result.entry["config"]["block_m"] == 16
    [failed] = [t for t in result.entry["tried"] if "error" in t]
    assert failed["error"].startswith("RuntimeError: out of resources")


def test_a_winner_that_fails_verification_is_not_stored():
    def verifier(backend, config, p, seed):
        return "out: max error 1.0e+00 > bound 1.0e-03" if config is not None and config.block_m == 16 else None

    result = _tune(ScriptedTimer({"reference": 3.0, "triton block_m=16": 1.0, "triton block_m=32": 2.0}),
                   verifier=verifier)
    assert result.entry["config"]["block_m"] == 32
    assert any(t.get("rejected", "").startswith("failed verification: out: max error") for t in result.tried)


def test_nothing_runs_gives_a_failed_bucket():
    result = _tune(ScriptedTimer({"": RuntimeError("no")}))
    assert (result.status, result.entry, result.note) == ("failed", None, "no candidate ran")


def _grid(**changes) -> tuner.Grid:
    base = dict(dtypes=("float16",), head_dims=(16,), causal=(False, True), lengths=((16, 16), (32, 32)),
                modes=("fwd",), backends=("reference", "triton"))
    return tuner.Grid(**{"extras": (), **base, **changes})


def test_run_stores_each_bucket_and_resumes_after_an_interruption(isolated_cache, monkeypatch):
    monkeypatch.setattr(tuner, "TOKENS", 32)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    timer = ScriptedTimer({"reference": 2.0, "triton": 1.0})
    seen = []

    def interrupt_third(p, i, n):
        seen.append(i)
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tuner.run(_grid(), _cpu(), timer, isolated_cache, on_bucket=interrupt_third, on_candidate=timer.announce,
                  verifier=lambda *a: None)
    assert len(cache.read_entries(_cpu(), isolated_cache)) == 2
    results = tuner.run(_grid(), _cpu(), timer, isolated_cache, on_candidate=timer.announce,
                        verifier=lambda *a: None)
    assert [r.status for r in results] == ["cached", "cached", "tuned", "tuned"]
    assert len(cache.read_entries(_cpu(), isolated_cache)) == 4
    forced = tuner.run(_grid(), _cpu(), timer, isolated_cache, force=True, on_candidate=timer.announce,
                       verifier=lambda *a: None)
    assert [r.status for r in forced] == ["tuned"] * 4


def test_run_retunes_stale_entries(isolated_cache, monkeypatch):
    monkeypatch.setattr(tuner, "TOKENS", 32)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    timer = ScriptedTimer({"reference": 2.0, "triton": 1.0})
    grid = _grid(causal=(False,), lengths=((16, 16),))
    [first] = tuner.run(grid, _cpu(), timer, isolated_cache, on_candidate=timer.announce, verifier=lambda *a: None)
    stale = {**first.entry, "versions": {**first.entry["versions"], "triton": "3.5.0"}}
    cache.store(_cpu(), {first.bucket.key: stale}, isolated_cache)
    [again] = tuner.run(grid, _cpu(), timer, isolated_cache, on_candidate=timer.announce, verifier=lambda *a: None)
    assert again.status == "tuned" and cache.is_fresh(cache.read_entries(_cpu(), isolated_cache)[first.bucket.key],
                                                      _cpu())


def _stale_triton_sources(entry: dict) -> dict:
    """The entry as if Triton's kernel sources changed after it was measured."""
    out = {**entry, "kernel_hash": "0" * 16 if entry["backend"] == "triton" else entry.get("kernel_hash")}
    out["per_backend"] = {name: ({**alt, "kernel_hash": "0" * 16} if name == "triton" else alt)
                          for name, alt in (entry.get("per_backend") or {}).items()}
    return out


def test_a_kernel_source_change_re_tunes_that_backend_and_times_the_others_picks_again(isolated_cache, monkeypatch):
    """Partial re-tune (tuner module docstring): only the changed backend's candidates are all
    timed; the other backend (the reference: no sources of ours) is timed once, with its stored
    pick, in the same run; the winner comes from these fresh timings; --whole times everything."""
    monkeypatch.setattr(tuner, "TOKENS", 32)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    grid = _grid(causal=(False,), lengths=((16, 16),))
    timer = ScriptedTimer({"reference": 2.0, "triton": 1.0})
    [first] = tuner.run(grid, _cpu(), timer, isolated_cache, on_candidate=timer.announce, verifier=lambda *a: None)
    n_triton = sum(label.startswith("triton") for label in timer.calls)
    assert n_triton >= 2 and first.entry["backend"] == "triton" and "partial" not in first.entry
    stale = _stale_triton_sources(first.entry)
    assert cache.changed_backends(stale, _cpu(), grid.backends) == {"triton"}
    assert cache.changed_backends(first.entry, _cpu(), grid.backends) is None  # fresh: nothing to search
    other_versions = {**stale, "versions": {**stale["versions"], "torch": "0.0"}}
    assert cache.changed_backends(other_versions, _cpu(), grid.backends) is None  # whole re-tune

    # the new Triton sources are slower than the reference now: the fresh timings decide
    cache.store(_cpu(), {first.bucket.key: stale}, isolated_cache)
    slower = ScriptedTimer({"reference": 2.0, "triton": 3.0})
    [again] = tuner.run(grid, _cpu(), slower, isolated_cache, on_candidate=slower.announce, verifier=lambda *a: None)
    assert again.status == "tuned" and again.entry["backend"] == "reference"
    assert [c for c in slower.calls if c.startswith("reference")] == ["reference"]
    assert sum(c.startswith("triton") for c in slower.calls) == n_triton
    assert again.entry["partial"] == {"searched": ["triton"], "picks_timed_again": ["reference"],
                                      "previous": first.entry["tuned_at"]}
    assert all(t["ms"] in (2.0, 3.0) for t in again.entry["tried"] if "ms" in t)  # this run's timings only
    assert cache.is_fresh(cache.read_entries(_cpu(), isolated_cache)[first.bucket.key], _cpu())

    # --whole (full=True): the same stale entry re-tuned whole, no "partial" record
    cache.store(_cpu(), {first.bucket.key: stale}, isolated_cache)
    whole = ScriptedTimer({"reference": 2.0, "triton": 1.0})
    [full] = tuner.run(grid, _cpu(), whole, isolated_cache, full=True, on_candidate=whole.announce,
                       verifier=lambda *a: None)
    assert "partial" not in full.entry and sum(c.startswith("triton") for c in whole.calls) == n_triton


def test_a_partial_re_tune_times_unchanged_backends_only_at_their_stored_pick():
    """With Triton unchanged and the reference searched (as if it had sources that changed),
    Triton is timed once, at its stored config, not at every config of its space."""
    p = problem(B=1, H=2, Hkv=2, Mq=16, Mkv=16, D=16)
    timer = ScriptedTimer({"reference": 3.0, "triton block_m=32": 2.0, "triton block_m=16": 1.0})
    first = _tune(timer, p).entry
    assert first["config"]["block_m"] == 16
    timer = ScriptedTimer({"reference": 3.0, "triton block_m=32": 2.0, "triton block_m=16": 1.0})
    entry = _tune(timer, p, incumbent=first, search={"reference"}).entry
    triton_calls = [c for c in timer.calls if c.startswith("triton")]
    assert len(triton_calls) == 1 and triton_calls[0].startswith("triton block_m=16")
    assert entry["backend"] == "triton" and entry["config"] == first["config"]
    # a stored pick that no longer parses: that backend is searched whole
    broken = {**first, "config": {"no_such_field": 1}}
    timer = ScriptedTimer({"reference": 3.0, "triton": 1.0})
    entry = _tune(timer, p, incumbent=broken, search={"reference"}).entry
    assert entry["partial"]["searched"] == ["reference", "triton"]
    assert sum(c.startswith("triton") for c in timer.calls) >= 2


def test_dry_run_says_which_stale_buckets_re_tune_in_part(isolated_cache, monkeypatch, capsys):
    from fa2dispatch.autotune import command

    monkeypatch.setattr(tuner, "TOKENS", 32)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    grid = _grid(causal=(False,), lengths=((16, 16),))
    timer = ScriptedTimer({"reference": 2.0, "triton": 1.0})
    [first] = tuner.run(grid, _cpu(), timer, isolated_cache, on_candidate=timer.announce, verifier=lambda *a: None)
    cache.store(_cpu(), {first.bucket.key: _stale_triton_sources(first.entry)}, isolated_cache)
    command.dry_run(grid, _cpu(), isolated_cache, None, force=False)
    assert "[stale: partial re-tune, all of triton and the other backends' stored picks]" in capsys.readouterr().out
    command.dry_run(grid, _cpu(), isolated_cache, None, force=False, full=True)
    assert "partial re-tune" not in capsys.readouterr().out


def test_run_notes_an_unwritable_cache_and_goes_on(isolated_cache, monkeypatch):
    monkeypatch.setattr(tuner, "TOKENS", 32)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    _deny_writes(isolated_cache, monkeypatch)
    timer = ScriptedTimer({"reference": 2.0, "triton": 1.0})
    try:
        results = tuner.run(_grid(lengths=((16, 16),)), _cpu(), timer, isolated_cache, on_candidate=timer.announce,
                            verifier=lambda *a: None)
    finally:
        isolated_cache.chmod(0o700)
    assert [r.status for r in results] == ["tuned", "tuned"]
    assert all(r.note.startswith("not stored: cannot write") for r in results)


def test_summarize_gives_median_and_interquartile_range():
    t = summarize([float(x) for x in range(1, 22)])
    assert (t.ms, t.spread, t.runs) == (11.0, 10.0, 21)


@pytest.mark.interpreter
def test_real_tuning_run_under_the_interpreter(isolated_cache, monkeypatch):
    """Two Triton configs at a tiny shape, timed on the host clock, verified against the
    float64 reference (for real), stored, and then used by the dispatcher."""
    monkeypatch.setattr(tuner, "TOKENS", 24)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    grid = tuner.Grid(extras=(), dtypes=("float16",), head_dims=(16,), causal=(True,), lengths=((24, 24),),
                      modes=("fwd",),
                      backends=("triton",), level="quick")
    [result] = tuner.run(grid, _cpu(), WallTimer(runs=20), isolated_cache)
    assert result.status == "tuned", result.note
    timed = [t for t in result.entry["tried"] if "ms" in t]
    assert len(timed) == 2 and {t["config"]["block_m"] for t in timed} == {16, 32}
    assert all(t["runs"] == 20 and t["ms"] > 0 for t in timed)
    p = tuner.tuning_problem(torch.float16, 16, True, 24, 24, False, torch.device("cpu"))
    decision = dispatch.select(p, "auto")  # the cache now names the kernel for this bucket
    assert (decision.backend.name, decision.source) == ("triton", "tuned")
    assert decision.config.as_dict() == result.entry["config"]
    entry = cache.lookup(_cpu(), p)[0]
    assert os.path.basename(entry.path) == cache.file_name(_cpu())


def test_a_verification_that_raises_moves_on_to_the_next_candidate():
    def verifier(backend, config, p, seed):
        if config is not None and config.block_m == 16:
            raise RuntimeError("out of resources at the reduced size")
        return None

    result = _tune(ScriptedTimer({"reference": 3.0, "triton block_m=16": 1.0, "triton block_m=32": 2.0}),
                   verifier=verifier)
    assert result.entry["config"]["block_m"] == 32
    assert any("verification raised RuntimeError: out of resources" in t.get("rejected", "") for t in result.tried)


def test_grid_puts_forward_buckets_first_and_leaves_the_reference_out():
    grid = tuner.Grid(extras=(), modes=("bwd", "fwd"), dtypes=("float16",), head_dims=(64,), causal=(False,),
                      lengths=((1024, 1024),))
    assert [p.requires_grad for p in grid.problems(torch.device("cpu"))] == [False, True]
    assert "reference" not in tuner.Grid().backends and "triton" in tuner.Grid().backends


def test_each_other_backends_fastest_verified_config_is_kept():
    def verifier(backend, config, p, seed):
        return "wrong" if config is not None and config.block_m == 16 else None

    timer = ScriptedTimer({"reference": 0.5, "triton block_m=16": 1.0, "triton block_m=32": 2.0})
    entry = _tune(timer, verifier=verifier).entry
    assert entry["backend"] == "reference"
    assert list(entry["per_backend"]) == ["triton"]
    assert entry["per_backend"]["triton"]["config"]["block_m"] == 32 and entry["per_backend"]["triton"]["ms"] == 2.0


def test_a_runner_up_config_ahead_only_by_noise_does_not_replace_that_backends_default():
    """Per backend the winner's rule: its default config (block_m=32 on CPU) stays unless
    another beats it by more than the spread; runner-ups are listed fastest first."""
    noise = _tune(ScriptedTimer({"reference": 0.5, "triton block_m=16": 1.95, "triton block_m=32": 2.0},
                                spread=0.1)).entry
    assert noise["per_backend"]["triton"]["config"]["block_m"] == 32
    clear = _tune(ScriptedTimer({"reference": 0.5, "triton block_m=16": 1.5, "triton block_m=32": 2.0},
                                spread=0.1)).entry
    assert clear["per_backend"]["triton"]["config"]["block_m"] == 16


def test_backward_buckets_take_tritons_tuned_forward_fields():
    forward = tuner.tuning_problem(torch.float16, 64, False, 1024, 1024, False, torch.device("cpu"))
    backward = replace(forward, requires_grad=True)
    tuned_fwd = TritonConfig(block_m=64, block_n=64, num_warps=4, num_stages=3).as_dict()
    key = bucket_of(forward).key
    assert tuner._triton_base(backward, {key: {"backend": "triton", "config": tuned_fwd}}) == TritonConfig(**tuned_fwd)
    runner_up = {key: {"backend": "torch-sdpa-cudnn", "config": None, "per_backend": {"triton": {"config": tuned_fwd}}}}
    assert tuner._triton_base(backward, runner_up) == TritonConfig(**tuned_fwd)
    assert tuner._triton_base(backward, {}) is None


def test_default_grid_adds_gqa_and_decode_buckets_and_named_grids_are_exact():
    keys = {bucket_of(p).key for p in tuner.Grid().problems(torch.device("cpu"))}
    assert "bwd/bfloat16/d128/causal/g4/q16384/k16384" in keys and "fwd/float16/d128/causal/g4/q1/k4096" in keys
    assert len(keys) == 48 + len(tuner.DEFAULT_EXTRAS)
    named = {bucket_of(p).key for p in tuner.Grid(extras=(), dtypes=("float16",)).problems(torch.device("cpu"))}
    assert all("/g1/" in k for k in named) and len(named) == 24


def test_backward_buckets_on_a_tuned_forward_base_still_time_the_default():
    p = problem(requires_grad=True)
    base = replace(space.BACKENDS["triton"].default_config(p, H100), block_m=64, block_n=32, num_warps=4)
    assert base != space.BACKENDS["triton"].default_config(p, H100)
    keep, _ = space.candidates(p, H100, ["triton"], "default", triton_base=base)
    configs = [c.config for c in keep]
    assert configs[0] == space.BACKENDS["triton"].default_config(p, H100) and configs[1] == base
    assert all(c.block_m == 64 for c in configs[1:])


def test_grid_groups_make_gqa_buckets():
    grid = tuner.Grid(extras=(), dtypes=("float16",), head_dims=(128,), causal=(True,), lengths=((1024, 1024),),
                      modes=("bwd",), groups=(4,))
    [p] = grid.problems(torch.device("cpu"))
    assert (p.H, p.Hkv, bucket_of(p).key) == (16, 4, "bwd/float16/d128/causal/g4/q1024/k1024")
