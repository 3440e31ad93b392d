"""fa2dispatch.autotune.precompile (``fa2dispatch autotune --jobs N``): a bucket's candidates run
once in spawned worker processes before the tuner times them, so the tuner's first call of each
loads the compiled kernel from Triton's disk cache. On CPU the workers run the candidates for
real (Triton under the interpreter, the reference in PyTorch); the GPU test checks that the
tuner's first call of a ping-pong candidate compiles nothing after the workers ran it."""

from __future__ import annotations

import json
import re

import pytest
import torch
from fa2dispatch.backends.triton_fa2.config import TritonConfig

from fa2dispatch.autotune import cache, space, tuner
from fa2dispatch.autotune.precompile import Precompiler
from fa2dispatch.autotune.space import Candidate
from fa2dispatch.hardware import device_info
from fa2dispatch.problem import AttentionProblem


def _problem(device: str = "cpu", **changes) -> AttentionProblem:
    fields = {"B": 1, "H": 2, "Hkv": 2, "Mq": 32, "Mkv": 32, "D": 16, "dtype": torch.float16,
              "device": torch.device(device), "layout": "bshd", "causal": True, "softmax_scale": 0.25}
    return AttentionProblem(**{**fields, **changes})


def _candidates(p: AttentionProblem) -> list[Candidate]:
    keep, _ = space.candidates(p, device_info(p.device), ["triton", "reference"], "quick")
    return keep


@pytest.mark.interpreter
def test_every_candidate_runs_once_in_the_workers():
    p = _problem()
    cands = _candidates(p)
    assert len(cands) >= 3 and {c.backend for c in cands} == {"triton", "reference"}
    ahead = Precompiler(2)
    try:
        ahead.warm(p, cands)
        assert (ahead.stats.buckets, ahead.stats.ran, ahead.stats.failed, ahead.stats.timeouts) == (1, len(cands), 0, 0)
        ahead.warm(_problem(causal=False), cands[:1])  # the same workers, a second bucket
        assert (ahead.stats.buckets, ahead.stats.ran) == (2, len(cands) + 1)
    finally:
        ahead.close()
    assert "compiled ahead (2 workers): " in ahead.stats.line(2)


@pytest.mark.interpreter
def test_a_failing_candidate_is_counted_and_left_to_the_tuner():
    """block_m=24 is no power of two: tl.arange refuses it in the worker, as it would in the
    tuner (which records the error); the other candidates still run."""
    p = _problem()
    good = _candidates(p)[:2]
    bad = Candidate("triton", TritonConfig(block_m=24, block_n=16, num_warps=4, num_stages=1))
    ahead = Precompiler(1)
    try:
        ahead.warm(p, [good[0], bad, good[1]])
    finally:
        ahead.close()
    assert (ahead.stats.ran, ahead.stats.failed, ahead.stats.timeouts) == (2, 1, 0)
    [error] = ahead.stats.errors
    assert error.startswith("triton block_m=24") and "block_m=24" in ahead.stats.line(1)


@pytest.mark.interpreter
def test_a_bucket_past_the_timeout_stops_its_workers_and_the_next_starts_fresh():
    p = _problem()
    cands = _candidates(p)
    ahead = Precompiler(1, timeout=0.001)  # a spawned worker cannot even start in a millisecond
    try:
        ahead.warm(p, cands)
        assert (ahead.stats.timeouts, ahead.stats.ran, ahead.stats.failed) == (1, 0, len(cands))
        assert ahead._pool is None  # terminated, not left running into the tuner's timings
        ahead.timeout = 120.0
        ahead.warm(p, cands)
        assert (ahead.stats.timeouts, ahead.stats.ran) == (1, len(cands))
    finally:
        ahead.close()


@pytest.mark.parametrize("jobs, timeout, word", [(0, 1.0, "jobs=0"), (-2, 1.0, "jobs=-2"), (True, 1.0, "jobs=True"),
                                                 (2, 0, "timeout=0")])
def test_bad_arguments_are_refused_by_name(jobs, timeout, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        Precompiler(jobs, timeout)


def test_the_tuner_warms_each_tuned_bucket_once_before_its_first_timing(tmp_path, monkeypatch):
    """tuner.run's before_timing: called once per bucket it tunes, with exactly the candidates it
    then times, before the first of them; never for a bucket found fresh in the cache."""
    from fa2dispatch.autotune.timer import Timing

    monkeypatch.setattr(tuner, "TOKENS", 32)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    events = []

    def timer(fn):
        events.append("time")
        return Timing(1.0, 0.01, 20)

    def warm(problem, cands, seed):
        events.append(("warm", bucket_key(problem), len(cands), seed))

    def bucket_key(problem):
        from fa2dispatch.autotune.buckets import bucket_of

        return bucket_of(problem).key

    grid = tuner.Grid(dtypes=("float16",), head_dims=(16,), causal=(False, True), lengths=((16, 16),),
                      modes=("fwd",), backends=("reference", "triton"), extras=())
    cpu = device_info(torch.device("cpu"))
    results = tuner.run(grid, cpu, timer, tmp_path, verifier=lambda *a: None, before_timing=warm)
    assert [r.status for r in results] == ["tuned", "tuned"]
    for result in results:
        timed = [t for t in result.entry["tried"] if "ms" in t]
        warmed = [e for e in events if isinstance(e, tuple) and e[1] == result.bucket.key]
        assert warmed == [("warm", result.bucket.key, len(timed), 0)]
    # each warm comes right before its bucket's timings
    marks = [i for i, e in enumerate(events) if isinstance(e, tuple)]
    assert marks[0] == 0 and events[marks[1] - 1] == "time"
    events.clear()
    again = tuner.run(grid, cpu, timer, tmp_path, verifier=lambda *a: None, before_timing=warm)
    assert [r.status for r in again] == ["cached", "cached"] and events == []


@pytest.mark.interpreter
def test_the_command_compiles_ahead_with_jobs_and_says_what_ran(capsys, tmp_path, monkeypatch):
    from fa2dispatch import cli

    monkeypatch.setattr(tuner, "TOKENS", 64)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    monkeypatch.setenv("COLUMNS", "300")  # the summary on one line
    flags = ["autotune", "--dtype", "fp16", "--head-dim", "16", "--seqlen", "32", "--causal", "true", "--mode", "fwd",
             "--backends", "triton,reference", "--quick", "--runs", "20", "--cache-dir", str(tmp_path), "--jobs", "2"]
    assert cli.main(flags) == 0
    out = capsys.readouterr().out
    path = tmp_path / cache.file_name(device_info(torch.device("cpu")))
    [entry] = json.loads(path.read_text())["entries"].values()
    timed = sum("ms" in t for t in entry["tried"])
    assert f"compiled ahead (2 workers): {timed} candidates ran in 1 buckets" in out, out
    assert "0 failed or unfinished there" in out and "0 bucket(s) past the timeout" in out


_FIRST_CALL = r"""
import json, sys, time, torch, triton
from fa2dispatch.autotune.tuner import _inputs, _step
sys.path.insert(0, sys.argv[1])
from test_precompile import _gpu_case
p, cand = _gpu_case()
events = []
triton.knobs.compilation.listener = lambda **kw: events.append(bool(kw["cache_hit"]))
step = _step(p, cand, _inputs(p, 0))
start = time.perf_counter()
step()
torch.cuda.synchronize()
print(json.dumps({"cache_hits": events, "seconds": time.perf_counter() - start}))
"""


def _gpu_case():
    p = _problem("cuda:0", B=2, H=3, Hkv=3, Mq=640, Mkv=640, D=128)
    cand = Candidate("triton", TritonConfig(block_m=128, block_n=128, num_warps=12, num_stages=2, fwd_v_stages=2,
                                            fwd_kernel="gluon-pp", fwd_maxnreg=240, fwd_tile_grid=1))
    return p, cand


@pytest.mark.gpu
def test_gpu_the_tuners_first_call_loads_what_a_worker_compiled(tmp_path, monkeypatch):
    """On a GPU, with an empty Triton cache: a worker runs a ping-pong candidate; then a fresh
    process (the tuner's stand-in: nothing in its memory) makes its first call of it, and every
    kernel Triton hands it is a disk-cache hit (the compilation listener's cache_hit)."""
    import os
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if device_info(torch.device("cuda")).capability != (9, 0):
        pytest.skip("the ping-pong kernel is sm_90 code")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # spawned workers inherit it
    p, cand = _gpu_case()
    ahead = Precompiler(1)
    try:
        ahead.warm(p, [cand])
    finally:
        ahead.close()
    assert (ahead.stats.ran, ahead.stats.failed) == (1, 0), ahead.stats
    assert any((tmp_path / "triton").iterdir()), "the worker left nothing in the Triton cache"
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL, os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cache_hits"] and all(report["cache_hits"]), report
