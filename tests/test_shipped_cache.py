"""The autotune results shipped for the H100 (autotune_cache/): valid, matching today's kernel
sources, and used by the dispatcher on that device (planned here through the h100 profile)."""

from __future__ import annotations

import json

import pytest
import torch

from fa2dispatch import dispatch
from fa2dispatch.autotune import cache
from fa2dispatch.autotune import tuner
from fa2dispatch.autotune.buckets import Bucket, bucket_of
from fa2dispatch.backends import BACKENDS
from fa2dispatch.hardware import simulated_device
from fa2dispatch.problem import AttentionProblem

H100 = simulated_device("h100")
SHIPPED = cache.shipped_dir() / cache.file_name(H100)  # the real shipped dir (resolved at import)


@pytest.fixture
def shipped(monkeypatch):
    monkeypatch.setattr(cache, "shipped_dir", lambda: SHIPPED.parent)
    cache.reload()
    dispatch.clear_memo()


def test_the_shipped_file_matches_the_kernel_sources_and_is_complete():
    """Every shipped result was measured on today's sources of its backend: a kernel change
    means re-tuning that backend's buckets on the H100 and re-shipping."""
    assert SHIPPED.is_file(), f"{SHIPPED.name} missing"
    data = cache.read(SHIPPED)
    for key, entry in data["entries"].items():
        results = {entry["backend"]: entry, **entry["per_backend"]}
        for name, result in results.items():
            assert result["kernel_hash"] == cache.kernel_hash(name), f"{key}: {name} tuned on other sources"
    assert (data["device_key"]["name"], data["device_key"]["arch"]) == (H100.name, H100.arch)
    keys = {Bucket.from_key(k) for k in data["entries"]}
    assert keys >= {bucket_of(p) for p in tuner.Grid().problems(torch.device("cpu"))}  # the whole default grid
    for key, entry in data["entries"].items():
        assert entry["backend"] in BACKENDS and entry["verified"] is True, key
        # never slower than the default beyond the noise of either timing (the tuner's rule: an
        # incumbent stays unless a challenger beats it by more than both spreads)
        default = entry["default"]
        timed = [t for t in entry["tried"] if "ms" in t and (t["backend"], t["config"]) == (default["backend"],
                                                                                          default["config"])]
        assert timed, f"{key}: the default's timing is not in tried"
        assert entry["ms"] <= default["ms"] + max(entry["spread"], timed[0]["spread"]), key
        for alt in entry["per_backend"].values():  # no runner-up beat the winner by more than the noise
            assert entry["ms"] - alt["ms"] <= max(entry["spread"], alt["spread"]), key
    json.dumps(data)  # plain JSON all the way down


def test_the_dispatcher_uses_the_shipped_results_on_an_h100(shipped):
    p = AttentionProblem(B=4, H=16, Hkv=16, Mq=4096, Mkv=4096, D=128, dtype=torch.float16, device=torch.device("cpu"),
                         layout="bshd", causal=True, softmax_scale=128**-0.5)
    decision = dispatch.select(p, device=H100)
    assert decision.source == "tuned"
    assert decision.tuned_from == f"fwd/float16/d128/causal/g1/q4096/k4096 in {SHIPPED}"
