"""Buckets and the autotune cache as the dispatcher reads it: tuned winners, nearest buckets,
user over shipped, and files and results that must be ignored (damaged, another device, other kernel sources)."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from fa2dispatch import dispatch
from fa2dispatch.autotune import cache
from fa2dispatch.autotune.buckets import Bucket, bucket_of, pow2_ceil
from fa2dispatch.backends import BACKENDS
from fa2dispatch.backends.triton_fa2.config import TritonConfig
from fa2dispatch.hardware import simulated_device
from fa2dispatch.problem import AttentionProblem

H100 = "h100"
TUNED = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 4}


def problem(**overrides) -> AttentionProblem:
    fields = dict(B=2, H=16, Hkv=16, Mq=4000, Mkv=4000, D=128, dtype=torch.float16, device=torch.device("cpu"),
                  layout="bshd", causal=False, softmax_scale=128**-0.5)
    return AttentionProblem(**{**fields, **overrides})


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """An empty user cache dir and an empty shipped dir."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(user))
    monkeypatch.setattr(cache, "shipped_dir", lambda: shipped)
    cache.reload()
    dispatch.clear_memo()
    yield user, shipped
    cache.reload()
    dispatch.clear_memo()


def write(directory, entries, profile=H100, **key_changes):
    device = simulated_device(profile)
    data = {"schema": cache.SCHEMA, "device_key": {**cache.device_key(device), **key_changes}, "entries": entries}
    path = directory / cache.file_name(device)
    path.write_text(json.dumps(data))
    cache.reload()
    dispatch.clear_memo()
    return path


def entry(backend="triton", config=TUNED, ms=1.0, **extra):
    return {"backend": backend, "config": config, "ms": ms, "kernel_hash": cache.kernel_hash(backend), **extra}


def select(**overrides):
    return dispatch.select(problem(**overrides), device=simulated_device(H100))


# ------------------------------------------------------------------ buckets


def test_bucket_rounds_lengths_up_to_powers_of_two_and_keys_round_trip():
    b = bucket_of(problem(Mq=1000, Mkv=4097, causal=True, H=32, Hkv=8, requires_grad=True))
    assert (b.mode, b.dtype, b.head_dim, b.causal, b.group, b.mq, b.mkv) == ("bwd", "float16", 128, True, 4, 1024,
                                                                             8192)
    assert b.key == "bwd/float16/d128/causal/g4/q1024/k8192"
    assert Bucket.from_key(b.key) == b
    lse = bucket_of(problem(requires_grad=True, return_lse=True))
    assert lse.key.endswith("/lse") and Bucket.from_key(lse.key) == lse
    assert bucket_of(problem(return_lse=True)).features == ()  # without gradients lse costs nothing
    assert [pow2_ceil(n) for n in (1, 2, 3, 4, 5, 1023, 1024, 1025)] == [1, 2, 4, 4, 8, 1024, 1024, 2048]


@pytest.mark.parametrize("key", ["", "fwd/float16/d128", "up/float16/d128/full/g1/q1/k1",
                                 "fwd/float16/dX/full/g1/q1/k1", "fwd/float16/d64/both/g1/q1/k1"])
def test_malformed_bucket_keys_raise(key):
    with pytest.raises(ValueError, match="is malformed"):
        Bucket.from_key(key)


# ------------------------------------------------------------------ lookups


def test_exact_bucket_gives_a_tuned_decision(dirs):
    user, _ = dirs
    path = write(user, {bucket_of(problem()).key: entry()})
    decision = select()
    assert (decision.backend.name, decision.source) == ("triton", "tuned")
    assert decision.config == TritonConfig(**TUNED)
    assert decision.tuned_from == f"fwd/float16/d128/full/g1/q4096/k4096 in {path}"
    assert decision.fallbacks == ("torch-sdpa-cudnn", "torch-sdpa-flash", "torch-sdpa-efficient", "reference")
    assert "  tuned   fwd/float16/d128/full/g1/q4096/k4096 in" in str(decision)


def test_unseen_bucket_uses_the_nearest_of_its_kind(dirs):
    user, _ = dirs
    far = {**TUNED, "block_m": 128}
    write(user, {"fwd/float16/d128/full/g1/q1024/k1024": entry(config=TUNED),
                 "fwd/float16/d128/full/g1/q65536/k65536": entry(config=far)})
    near = select(Mq=3000, Mkv=3000)  # 4096: 2 steps from 1024 in each length, 4 from 65536
    assert near.config == TritonConfig(**TUNED) and near.tuned_from.endswith("(nearest tuned bucket)")
    assert select(Mq=40000, Mkv=40000).config == TritonConfig(**far)
    # another kind (causal, another head dim, with gradients) has no tuned neighbour
    assert select(causal=True).source == "default"
    assert select(D=64).source == "default"
    assert select(requires_grad=True).source == "default"


def test_a_tuned_backend_that_cannot_run_the_call_gives_way(dirs):
    """The bucket's winner is cuDNN, but a call in the same bucket with causal Mq != Mkv is one
    cuDNN refuses (top-left causal): the dispatcher goes on to the priority order."""
    user, _ = dirs
    write(user, {"fwd/float16/d128/causal/g1/q4096/k4096": entry("torch-sdpa-cudnn", None)})
    assert select(causal=True).source == "tuned"
    unequal = select(causal=True, Mq=3000, Mkv=4000)  # same bucket, but cuDNN is top-left causal
    assert (unequal.backend.name, unequal.source) == ("triton", "default")


def test_user_entries_win_over_shipped_ones_per_bucket(dirs):
    user, shipped = dirs
    other = {**TUNED, "num_warps": 8}
    write(shipped, {bucket_of(problem()).key: entry(config=other),
                    bucket_of(problem(D=64)).key: entry(config=other)})
    write(user, {bucket_of(problem()).key: entry(config=TUNED)})
    assert select().config == TritonConfig(**TUNED)
    from_shipped = select(D=64)
    assert from_shipped.config == TritonConfig(**other) and str(shipped) in from_shipped.tuned_from


def test_damaged_file_is_reported_and_treated_as_empty(dirs, caplog):
    user, _ = dirs
    path = user / cache.file_name(simulated_device(H100))
    path.write_text('{"schema": 1, "device_key": {')
    cache.reload()
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert select().source == "default"
    assert any("damaged and ignored" in r.message and str(path) in r.message for r in caplog.records)
    [row] = [r for r in cache.describe(simulated_device(H100)) if r["origin"] == "user"]
    assert row["exists"] and row["entries"] == 0 and "unreadable" in row["error"]


@pytest.mark.parametrize("content, why", [('{"schema": 99, "device_key": {}, "entries": {}}', "schema 99"),
                                          ("[1, 2]", "schema 'list'"),
                                          ('{"schema": 2}', "missing device_key or entries"),
                                          ('{"schema": 1, "device_key": {}, "entries": {}}', "schema 1 (supported: 2)")])
def test_wrong_schema_is_treated_as_empty(dirs, content, why):
    user, _ = dirs
    (user / cache.file_name(simulated_device(H100))).write_text(content)
    cache.reload()
    assert select().source == "default"
    [row] = [r for r in cache.describe(simulated_device(H100)) if r["origin"] == "user"]
    assert why in row["error"]


def test_hard_mismatch_is_ignored_with_a_warning(dirs, caplog):
    user, _ = dirs
    write(user, {bucket_of(problem()).key: entry()}, arch="sm_80")
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert select().source == "default"
    assert any("belongs to another device (arch 'sm_80' != 'sm_90')" in r.message for r in caplog.records)
    [row] = [r for r in cache.describe(simulated_device(H100)) if r["origin"] == "user"]
    assert row["match"] == "hard: arch 'sm_80' != 'sm_90'"


def test_soft_mismatch_still_serves_and_says_so(dirs):
    user, _ = dirs
    write(user, {bucket_of(problem()).key: entry()}, torch="2.0.0")
    assert select().source == "tuned"
    [row] = [r for r in cache.describe(simulated_device(H100)) if r["origin"] == "user"]
    assert row["match"].startswith("soft: torch '2.0.0' != ") and row["entries"] == 1


def test_bad_entries_are_skipped_not_fatal(dirs, caplog):
    user, _ = dirs
    write(user, {"nonsense": entry(), bucket_of(problem()).key: entry(config={"block_q": 64}),
                 bucket_of(problem(D=64)).key: {"config": {}}})
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert select().source == "default"  # a config the backend does not take
        assert select(D=64).source == "default"
    text = " ".join(r.message for r in caplog.records)
    assert "entry 'nonsense' ignored" in text and "entry without a backend name" in text
    assert "autotune cache lookup failed" in text and "block_q" in text


def test_kernel_hashes_are_per_backend_and_the_file_name_is_the_device():
    device = simulated_device(H100)
    assert cache.file_name(device) == "nvidia-h100-80gb-hbm3_sm_90.json"
    hashes = cache.kernel_hashes()
    assert set(hashes) == set(cache.KERNEL_SOURCES) and len(hashes["triton"]) == 16
    assert len(set(hashes.values())) == len(hashes)  # each backend hashes its own sources
    assert cache.kernel_hash("torch-sdpa-cudnn") is None  # torch's kernels: the torch version covers them
    assert cache.device_key(device)["kernel_hashes"] == hashes


def test_results_measured_on_other_kernel_sources_are_dropped(dirs, caplog):
    """A stale winner gives way to its fastest current runner-up; a stale runner-up is dropped;
    an entry with nothing current left serves nothing. Each with one warning."""
    user, _ = dirs
    cudnn = {"config": None, "kernel_hash": None, "ms": 1.5}
    stale_triton = {"config": TUNED, "kernel_hash": "0" * 16, "ms": 1.2}
    write(user, {
        bucket_of(problem()).key: entry(kernel_hash="0" * 16, per_backend={"torch-sdpa-cudnn": cudnn}),
        bucket_of(problem(D=64)).key: entry("torch-sdpa-cudnn", None, per_backend={"triton": stale_triton}),
        bucket_of(problem(D=96)).key: entry(kernel_hash="f" * 16),
    })
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        promoted = select()
        assert (promoted.source, promoted.backend.name) == ("tuned", "torch-sdpa-cudnn")
        loaded = cache.lookup(simulated_device(H100), problem(D=64))[0]
        assert loaded.backend == "torch-sdpa-cudnn" and loaded.alternatives == ()
        assert cache.lookup(simulated_device(H100), problem(D=96)) == (None, False)
    text = " ".join(r.message for r in caplog.records)
    assert "3 result(s) of backend 'triton' were measured on other kernel sources" in text
    assert not cache.is_fresh(entry(kernel_hash="0" * 16), simulated_device(H100))
    assert not cache.is_fresh({**entry(), "versions": cache.soft_stamp(simulated_device(H100)),
                               "per_backend": {"triton": stale_triton}}, simulated_device(H100))
    assert cache.is_fresh({**entry(), "versions": cache.soft_stamp(simulated_device(H100))}, simulated_device(H100))


def test_locations_put_the_user_dir_first(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path))
    assert cache.locations()[0] == (tmp_path, "user")
    assert cache.locations()[1][1] == "shipped"
    monkeypatch.delenv(cache.ENV_CACHE_DIR)
    assert "fa2dispatch" in str(cache.user_dir())


def test_without_platformdirs_the_shipped_cache_still_serves(dirs, monkeypatch, caplog):
    """A --no-deps install may lack platformdirs: no user dir then (unless FA2DISPATCH_CACHE_DIR
    is set), one warning, and the shipped cache still answers."""
    _, shipped = dirs
    write(shipped, {bucket_of(problem()).key: entry()})
    monkeypatch.delenv(cache.ENV_CACHE_DIR)
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # import raises ImportError
    cache.reload()
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        assert select().source == "tuned"
        assert select(D=64).source == "default"
    assert [r.message for r in caplog.records].count(
        "fa2dispatch: no user cache dir: platformdirs not installed and FA2DISPATCH_CACHE_DIR not set") == 1
    rows = cache.describe(simulated_device(H100))
    assert rows[0]["origin"] == "user" and rows[0]["path"] is None and "platformdirs not installed" in rows[0]["error"]
    assert rows[1]["origin"] == "shipped" and rows[1]["entries"] == 1


def test_a_runner_up_serves_calls_the_winner_cannot_run(dirs):
    user, _ = dirs
    runner_up = {**TUNED, "block_n": 128}
    write(user, {"fwd/float16/d128/causal/g1/q4096/k4096": {
        **entry("torch-sdpa-cudnn", None, ms=1.0),
        "per_backend": {"torch-sdpa-flash": {"config": None, "ms": 1.5},
                        "triton": {"config": runner_up, "ms": 1.2, "kernel_hash": cache.kernel_hash("triton")}}}})
    assert select(causal=True).backend.name == "torch-sdpa-cudnn"
    unequal = select(causal=True, Mq=3000, Mkv=4000)  # cuDNN and flash refuse it; triton was tuned here too
    assert (unequal.backend.name, unequal.source, unequal.config) == ("triton", "tuned", TritonConfig(**runner_up))
    assert unequal.tuned_from.endswith("(runner-up: torch-sdpa-cudnn cannot run this call)")


def test_a_forced_backend_takes_its_tuned_config(dirs):
    """backend="triton" with a tuned Triton config in the bucket (as winner or runner-up) runs
    that config, says where it came from, and stays "forced"; without one, the default."""
    user, _ = dirs
    runner_up = {**TUNED, "block_n": 128}
    write(user, {
        "fwd/float16/d128/causal/g1/q4096/k4096": {
            **entry("torch-sdpa-cudnn", None, ms=1.0),
            "per_backend": {"triton": {"config": runner_up, "ms": 1.2, "kernel_hash": cache.kernel_hash("triton")}}},
        bucket_of(problem()).key: entry(config=TUNED)})
    device = simulated_device(H100)
    forced = dispatch.select(problem(causal=True, Mq=4096, Mkv=4096), "triton", device=device)
    assert (forced.source, forced.config) == ("forced", TritonConfig(**runner_up))
    assert forced.tuned_from == "fwd/float16/d128/causal/g1/q4096/k4096 in " \
        f"{user / cache.file_name(device)} (triton's tuned config)"
    assert dispatch.select(problem(), "triton", device=device).config == TritonConfig(**TUNED)
    untuned = dispatch.select(problem(D=64), "triton", device=device)
    assert untuned.config == BACKENDS["triton"].default_config(problem(D=64), device) and untuned.tuned_from is None
    assert "tuned   fwd/float16/d128/causal" in str(forced)


def test_kernel_hashes_ignore_documentation_but_not_code():
    """A docstring or comment edit leaves a kernel source's hashed text alone (tuned results
    stand); any code edit, a string constant that is a value included, changes it."""
    base = '"""Module doc."""\n\nimport x  # why\n\n\ndef f(a):\n    """Doc of f."""\n    # note\n    return a + 1\n'
    redoc = '"""Another module doc,\non two lines."""\nimport x  # why\n\ndef f(a):\n    """Other."""\n    return a + 1\n'
    assert cache.code_text(base) == cache.code_text(redoc)
    assert "Doc of f" not in cache.code_text(base) and "import x  # why" in cache.code_text(base)
    for edit in (base.replace("a + 1", "a + 2"), base.replace("import x", "import y"),
                 base + 'MSG = "value, not a docstring"\n'):
        assert cache.code_text(edit) != cache.code_text(base), edit
    one_line = 'def g(): """doc"""; return 1\n'  # a docstring sharing its line with code stays
    assert "return 1" in cache.code_text(one_line)
