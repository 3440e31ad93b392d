"""tools/fuzz.py's own machinery: the shared work queue (every config exactly once, costliest
first, one kernel specialisation per item), a crashed worker's unfinished work going back on the
queue, and an end-to-end CPU run over two workers resumed from its own report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402


def test_queue_holds_every_config_once_costliest_first():
    configs = fuzz.draw_configs(300, 0, "cuda", True, 64)
    items = fuzz.queue_order(configs, chunk=4)
    flat = [i for item in items for i in item]
    assert sorted(flat) == [c["index"] for c in configs]
    by_index = {c["index"]: c for c in configs}
    costs = [sum(fuzz.config_cost(by_index[i]) for i in item) for item in items]
    assert costs == sorted(costs, reverse=True)
    for item in items:
        assert 1 <= len(item) <= 4
        assert len({by_index[i]["spec"] for i in item}) == 1
        assert item == sorted(item)
    # float32 and wide heads are the costly ones: they lead the queue
    first = [by_index[i] for i in items[0]]
    assert all(c["dtype"] == "float32" for c in first)


def test_claim_and_requeue(tmp_path):
    queue = tmp_path / "queue.json"
    queue.write_text(json.dumps(dict(items=[[1, 2], [3], [4, 5]], next=0)))
    assert fuzz._claim(queue) == [1, 2]
    fuzz._requeue(queue, [2])  # the worker died on 1: 2 goes back first
    assert fuzz._claim(queue) == [2]
    assert fuzz._claim(queue) == [3]
    fuzz._requeue(queue, [])
    assert fuzz._has_work(queue)
    assert fuzz._claim(queue) == [4, 5]
    assert not fuzz._has_work(queue)
    assert fuzz._claim(queue) is None


def test_worker_log_gives_the_unfinished_config_and_item(tmp_path):
    log = tmp_path / "w0.1.jsonl"
    done = dict(config=dict(index=7), runs={})
    log.write_text("\n".join(json.dumps(x) for x in (
        dict(item=[3]), dict(start=3), dict(config=dict(index=3), runs={}),
        dict(item=[7, 8, 9]), dict(start=7), done, dict(start=8))) + "\n")
    results: dict = {}
    started, item = fuzz.read_worker_log(log, results)
    assert (started, item) == (8, [7, 8, 9])
    assert sorted(results) == [3, 7]
    assert fuzz.read_worker_log(tmp_path / "missing.jsonl", results) == (None, [])


@pytest.mark.interpreter
def test_cpu_run_over_two_workers_and_its_resume(tmp_path):
    """Six configs over two worker processes: each reported once, all checks pass; a resume of
    that report runs nothing more and reports the same configs."""
    out = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--device", "cpu", "--n", "6", "--workers", "2",
           "--no-long", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads(out.read_text())
    assert sorted(r["config"]["index"] for r in first["results"]) == list(range(6))
    assert first["summary"]["mismatches"] == 0 and first["summary"]["errors"] == 0
    assert "[w0]" in proc.stdout and "[w1]" in proc.stdout  # both workers took work
    resumed = tmp_path / "resumed.json"
    proc = subprocess.run(cmd[:-1] + [str(resumed), "--resume", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 configs done" in proc.stdout and "0 left" in proc.stdout
    again = json.loads(resumed.read_text())
    assert [r["config"]["index"] for r in again["results"]] == [r["config"]["index"] for r in first["results"]]


@pytest.mark.interpreter
def test_a_worker_that_dies_is_reported_and_its_item_finished(tmp_path):
    """A worker that exits in the middle of config 2 (FUZZ_TEST_EXIT_AT): config 2 is reported
    as a crash (exit code 1), and config 3, the rest of its work item (one specialisation,
    ``--pool 1``: the item is [0, 1, 2, 3]), runs in a fresh worker."""
    import os

    assert fuzz.queue_order(fuzz.draw_configs(4, 0, "cpu", False, 1)) == [[0, 1, 2, 3]]
    out = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--device", "cpu", "--n", "4", "--pool", "1",
           "--workers", "1", "--no-long", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, FUZZ_TEST_EXIT_AT="2"))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CRASH (exit 7)" in proc.stdout
    report = json.loads(out.read_text())
    status = {r["config"]["index"]: {x["status"] for x in r["runs"].values()} for r in report["results"]}
    assert sorted(status) == [0, 1, 2, 3]
    assert status[2] == {"crash"}
    assert all("crash" not in s and "mismatch" not in s for i, s in status.items() if i != 2), status
    assert report["summary"]["errors"] == 1


def test_scales_are_drawn_from_their_own_stream_and_reach_call_and_reference():
    """--scales adds a softmax_scale per config (positive, negative and zero all occur) and
    leaves everything else of every config as without it; the call's keywords carry it."""
    plain = fuzz.draw_configs(200, 0, "cuda", True, 64)
    scaled = fuzz.draw_configs(200, 0, "cuda", True, 64, scales=True)
    assert [{k: v for k, v in c.items() if k != "softmax_scale"} for c in scaled] == plain
    values = [c["softmax_scale"] for c in scaled]
    assert any(s > 0 for s in values) and any(s < 0 for s in values) and 0.0 in values
    assert all(fuzz.scale_of(c) == c["D"] ** -0.5 for c in plain)
    cfg = next(c for c in scaled if c["softmax_scale"] < 0 and c["kind"] == "dense")
    assert fuzz.call_kwargs(cfg, "cpu")["softmax_scale"] == cfg["softmax_scale"]
    assert "softmax_scale" not in fuzz._math_kwargs(cfg, fuzz.call_kwargs(cfg, "cpu"))


@pytest.mark.interpreter
@pytest.mark.parametrize("scale", [-0.4, 0.0, 3.0])
def test_dense_check_with_a_drawn_scale_runs_the_call_and_the_reference_at_it(scale):
    """A dense config at a non-default scale through the Triton interpreter: the verdict compares
    the call and the float64 reference at the same scale (a reference left at 1/sqrt(D) would
    make every such check a mismatch)."""
    import torch

    cfg = dict(fuzz.draw_configs(1, 3, "cpu", False, 0)[0], softmax_scale=scale, dtype="float32",
               features={}, kind="dense", grad=True)
    result = fuzz.check_dense(cfg, "triton", torch.device("cpu"))
    assert result["status"] == "ok", result


def test_also_forces_dense_configs_onto_more_backends_and_counts_refusals(tmp_path):
    """--also: each dense config also runs forced onto the named backends (the worker processes
    get the list through the environment); a backend that cannot run a call is counted as a
    refusal (cupy on a CPU), not a failure; an unknown name is a usage error."""
    out = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(ROOT / "tools" / "fuzz.py"), "--device", "cpu", "--n", "4", "--workers", "1",
           "--no-long", "--json", str(out), "--also", "reference,cupy"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    dense = [r for r in results if r["config"]["kind"] == "dense"]
    assert dense, "no dense config drawn"
    for r in dense:
        assert r["runs"]["reference"]["status"] == "ok", r["runs"]["reference"]
        assert r["runs"]["cupy"]["status"] == "refused", r["runs"]["cupy"]
    for r in results:
        if r["config"]["kind"] != "dense":
            assert "cupy" not in r["runs"]
    bad = subprocess.run(cmd[:-1] + ["nosuch"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "--also: unknown backend(s) nosuch" in bad.stderr
