"""Backends on a real GPU: the Triton kernels over the interpreter matrix at realistic sizes
(every output element written, the backward bit-for-bit repeatable), the PyTorch SDPA
adapters over the part of the same matrix each can express, and the dispatcher's choices on
the real device. Skipped without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, check_case, make_inputs

import fa2dispatch
from fa2dispatch import dispatch
from fa2dispatch.backends import BACKENDS
from fa2dispatch.hardware import device_info, simulated_device
from fa2dispatch.problem import AttentionProblem

pytestmark = pytest.mark.gpu

# (B, H, Hkv, Mq, Mkv, D): realistic lengths, odd ones (1025, 2049, 97), Mq != Mkv both ways,
# GQA/MQA, head dims 64/128/256 and padded ones (40, 96, 136, 200).
SHAPES = [
    (2, 8, 8, 1024, 1024, 64),
    (2, 8, 8, 2048, 2048, 128),
    (1, 16, 2, 1025, 2049, 128),
    (1, 8, 1, 2049, 1025, 64),
    (4, 4, 4, 97, 4096, 256),
    (1, 6, 2, 1000, 1000, 40),
    (2, 4, 4, 777, 1333, 96),
    (1, 4, 4, 513, 513, 136),
    (8, 8, 1, 1, 8192, 128),
    (1, 2, 2, 300, 700, 200),
]
DTYPES = [torch.float16, torch.bfloat16]


def _matrix():
    cases = []
    for i, shape in enumerate(SHAPES):
        for dtype in DTYPES:
            for causal in (False, True):
                cases.append(Case(*shape, dtype=dtype, causal=causal, layout="bshd" if i % 2 == 0 else "bhsd"))
    cases.append(Case(2, 4, 2, 1023, 1500, 64, torch.float32, True))
    cases.append(Case(1, 4, 4, 512, 512, 128, torch.float32, False, "bhsd"))
    cases.append(Case(2, 8, 2, 1000, 1200, 64, torch.float16, True, "bshd", contiguous=False))
    cases.append(Case(2, 8, 8, 1000, 1200, 128, torch.bfloat16, False, "bhsd", contiguous=False))
    # batch x heads past 65535 (gridDim.y's limit; the kernels use a 1-D grid), decode-like
    cases.append(Case(1024, 72, 8, 1, 80, 64, torch.float16, True))
    return cases


MATRIX = _matrix()


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_forward_backward_matches_reference(case, nan_poison):
    """Outputs are NaN-poisoned before the kernels run; check_case fails on any NaN left."""
    check_case(case, device="cuda", seed=1)


def _device():
    """The GPU's DeviceInfo; at collection on a machine without one, the H100 profile (the lent
    GPU), so the generated matrix is the one that runs there."""
    return device_info(torch.device("cuda")) if torch.cuda.is_available() else simulated_device("h100")


def _problem(case: Case) -> AttentionProblem:
    return AttentionProblem(case.B, case.H, case.Hkv, case.Mq, case.Mkv, case.D, case.dtype, torch.device("cuda"),
                            case.layout, case.causal, case.D**-0.5, requires_grad=True)


SDPA = [name for name in BACKENDS if name.startswith("torch-sdpa-")]
SDPA_CASES = [(name, case) for name in SDPA for case in MATRIX
              if not BACKENDS[name].not_supported_reasons(_problem(case), _device())]


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.0])
def test_any_finite_softmax_scale(backend, scale, nan_poison):
    """softmax_scale is any finite number: negative (the largest scaled score is the smallest
    raw one), zero (uniform weights over the visible keys) and large; causal with Mq > Mkv has
    rows that see no key. Forward, lse and backward against float64."""
    from helpers import check_close, check_lse, math_with_grads, max_magnitude

    case = Case(2, 4, 2, 700, 300, 128, torch.float16, True)
    q, k, v, dout = make_inputs(case, device="cuda", seed=17)
    truth = math_with_grads(q, k, v, dout, case, torch.float64, scale=scale)
    low = math_with_grads(q, k, v, dout, case, case.dtype, scale=scale)
    magnitude = max_magnitude(truth[0], *truth[2:])
    with torch.no_grad():
        _, lse = fa2dispatch.attention(q, k, v, causal=True, softmax_scale=scale, return_lse=True, backend=backend)
    check_lse(lse, truth[1], low[1])
    out = fa2dispatch.attention(q, k, v, causal=True, softmax_scale=scale, backend=backend)
    check_close("out", out, truth[0], low[0], magnitude)
    for name, ours, t, lp in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), truth[2:], low[2:]):
        check_close(name, ours, t, lp, magnitude)


def test_every_sdpa_adapter_has_cases():
    assert {name for name, _ in SDPA_CASES} == set(SDPA)


@pytest.mark.parametrize("backend, case", SDPA_CASES, ids=[f"{n}-{c.id}" for n, c in SDPA_CASES])
def test_sdpa_adapter_matches_reference(backend, case, nan_poison):
    """PyTorch's kernels behind our interface: out, lse (natural log, (B, H, Mq)) and gradients
    by the same rule as ours."""
    dispatch.clear_memo()
    check_case(case, device="cuda", seed=4, backend=backend)


def test_auto_dispatch_on_the_gpu_follows_the_priority_of_its_family():
    q, k, v, _ = make_inputs(Case(1, 8, 8, 256, 256, 64, torch.float16, True), device="cuda", requires_grad=False)
    decision = fa2dispatch.explain(q, k, v, causal=True)
    expected = "torch-sdpa-cudnn" if decision.device.capability >= (9, 0) else "triton"
    assert decision.backend.name == expected, str(decision)
    assert not decision.device.simulated and decision.device.driver and decision.device.toolkit
    gqa = make_inputs(Case(1, 8, 2, 256, 256, 64, torch.float16, True), device="cuda", requires_grad=False)
    assert fa2dispatch.explain(*gqa[:3], causal=True).backend.name == "triton"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_backward_is_bitwise_repeatable(dtype):
    case = Case(2, 16, 4, 2048, 2048, 128, dtype, causal=True)
    q, k, v, dout = make_inputs(case, device="cuda", seed=2)
    runs = []
    for _ in range(3):
        out = fa2dispatch.attention(q, k, v, causal=True, backend="triton")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for run in runs[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), runs[0], run):
            assert torch.equal(a, b), f"{name} differs between identical runs"


def test_torch_compile_fullgraph_on_gpu():
    case = Case(2, 8, 2, 512, 512, 64, torch.bfloat16, causal=True)
    q, k, v, dout = make_inputs(case, device="cuda", seed=3)

    def model(q, k, v):
        return fa2dispatch.attention(q, k, v, causal=True) * 2.0

    compiled = torch.compile(model, fullgraph=True)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = model(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_autotune_one_bucket_on_the_gpu(tmp_path):
    """The tuner with device events and L2 flushes on a real bucket: every candidate timed or
    recorded, the winner verified and stored, never slower than the default beyond the noise."""
    from fa2dispatch.autotune import cache, tuner
    from fa2dispatch.autotune.timer import CudaTimer

    device = device_info(torch.device("cuda"))
    grid = tuner.Grid(extras=(), dtypes=("float16",), head_dims=(64,), causal=(True,), lengths=((2048, 2048),),
                      modes=("fwd",),
                      level="quick")
    [result] = tuner.run(grid, device, CudaTimer(), tmp_path)
    assert result.status == "tuned", result.note
    entry = result.entry
    assert entry["verified"] and entry["runs"] >= 20
    assert entry["ms"] <= entry["default"]["ms"] + entry["spread"]
    timed = [t for t in entry["tried"] if "ms" in t]
    assert {t["backend"] for t in timed} >= {"triton", "torch-sdpa-cudnn", "torch-sdpa-flash"}
    assert cache.read_entries(device, tmp_path)[result.bucket.key]["backend"] == entry["backend"]


def test_fa2dispatch_autotune_env_tunes_a_missing_bucket_once(tmp_path, monkeypatch, caplog):
    import logging

    from fa2dispatch.autotune import cache

    monkeypatch.setenv("FA2DISPATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FA2DISPATCH_AUTOTUNE", "1")
    cache.reload()
    dispatch.clear_memo()
    q, k, v, _ = make_inputs(Case(2, 8, 8, 700, 700, 64, torch.bfloat16, False), device="cuda", requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        decision = fa2dispatch.explain(q, k, v)
        fa2dispatch.attention(q, k, v)
    assert decision.source == "tuned" and "fwd/bfloat16/d64/full/g1/q1024/k1024" in decision.tuned_from
    assert sum("FA2DISPATCH_AUTOTUNE=1: tuning" in r.message for r in caplog.records) == 1
    assert len(cache.read_entries(decision.device, tmp_path)) == 1
    cache.reload()
    dispatch.clear_memo()
