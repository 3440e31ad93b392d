"""The Gluon dK/dV kernel (kernels_gluon_bwd.py; session 12, branch s12-gluon-dkdv): offline
compile checks for sm_90 here, and on the H100 dK and dV against float64 truth under
STYLE.md's rule (tests/helpers.check_close: 2x PyTorch's own error in the same precision),
with lse and delta as launch.backward computes them. Not wired into the dispatcher yet."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import Case, check_close, make_inputs, math_with_grads, max_magnitude

from fa2dispatch.hardware import device_info


@pytest.mark.compile
def test_the_default_configs_compile_for_sm90_without_spills():
    """The configs a sweep would start from: no local memory (spills), the five wgmmas per
    step, shared memory within one SM's 227 KB twice over (two CTAs per SM)."""
    pytest.importorskip("triton.experimental.gluon")
    code = (
        "import json, torch\n"
        "from fa2dispatch.backends.triton_fa2.launch_gluon_bwd import compile_dkdv_sm90\n"
        "rows = []\n"
        "for d, bm in ((64, 64), (128, 32)):\n"
        "    for causal in (False, True):\n"
        "        rows.append(dict(compile_dkdv_sm90(torch.float16, d, causal, bm, 4), d=d, bm=bm, causal=causal))\n"
        "print(json.dumps(rows))\n")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    for row in json.loads(done.stdout.strip().splitlines()[-1]):
        assert row["ldl_stl"] == 0 and row["stack"] == 0, row
        assert row["wgmma"] >= 5 and row["smem"] <= 227 * 1024 // 2, row


CASES = [
    Case(2, 4, 4, 512, 512, 128, torch.float16, False, "bhsd"),
    Case(2, 4, 4, 512, 512, 128, torch.bfloat16, True, "bhsd"),
    Case(1, 8, 2, 256, 384, 64, torch.float16, True, "bshd"),  # GQA, Mkv > Mq (bottom-right)
    Case(1, 4, 1, 384, 128, 128, torch.bfloat16, True, "bhsd"),  # Mkv < Mq: rows that see no key
    Case(2, 2, 2, 1024, 1024, 64, torch.bfloat16, False, "bshd"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("block_m, num_warps", [(64, 4), (32, 4), (32, 8)])
def test_gluon_dkdv_matches_float64(case, block_m, num_warps):
    from fa2dispatch.backends.reference import attention_math
    from fa2dispatch.backends.triton_fa2 import launch_gluon_bwd

    if device_info(torch.device("cuda")).capability != (9, 0):
        pytest.skip("the Gluon backward is sm_90 code")
    q, k, v, dout = make_inputs(case, device="cuda", seed=7, requires_grad=False)
    scale = case.D**-0.5
    # lse and delta as launch.backward has them: (B, H, Mq); delta = rowsum(dO * O)
    ke, ve = (t.repeat_interleave(case.H // case.Hkv, 2 if case.layout == "bshd" else 1) for t in (k, v))
    out, lse = attention_math(q.float(), ke.float(), ve.float(), causal=case.causal, softmax_scale=scale,
                              layout=case.layout, compute_dtype=torch.float32)
    out = out.to(case.dtype)
    delta = (dout.float() * out.float()).sum(-1)
    if case.layout == "bshd":
        delta = delta.transpose(1, 2)
    lse, delta = lse.contiguous(), delta.contiguous()
    dk, dv = launch_gluon_bwd.dkdv(q, k, v, dout, lse, delta, case.causal, scale, case.layout, block_m, num_warps)
    torch.cuda.synchronize()
    truth = math_with_grads(q, k, v, dout, case, torch.float64)
    low = math_with_grads(q, k, v, dout, case, case.dtype)
    magnitude = max_magnitude(truth[0], *truth[2:])
    check_close("dk", dk, truth[3], low[3], magnitude)
    check_close("dv", dv, truth[4], low[4], magnitude)


@pytest.mark.gpu
def test_gluon_dkdv_refuses_what_it_cannot_take():
    from fa2dispatch.backends.triton_fa2 import launch_gluon_bwd

    case = Case(1, 2, 2, 200, 256, 128, torch.float16, False, "bhsd")  # Mq not a multiple of block_m
    q, k, v, dout = make_inputs(case, device="cuda", seed=1, requires_grad=False)
    lse = torch.zeros(1, 2, 200, device="cuda")
    with pytest.raises(ValueError, match="Mq=200"):
        launch_gluon_bwd.dkdv(q, k, v, dout, lse, lse, False, 0.1, "bhsd", 64, 4)
    with pytest.raises(ValueError, match="D=96"):
        x = torch.zeros(1, 2, 256, 96, device="cuda", dtype=torch.float16)
        launch_gluon_bwd.dkdv(x, x, x, x, lse, lse, False, 0.1, "bhsd", 64, 4)


def _bwd_problem(Mq=4096, Mkv=4096, D=128, dtype=torch.float16, **kw):
    from fa2dispatch.problem import AttentionProblem

    return AttentionProblem(B=4, H=16, Hkv=16, Mq=Mq, Mkv=Mkv, D=D, dtype=dtype, device=torch.device("cpu"),
                            layout="bhsd", causal=True, softmax_scale=D**-0.5, requires_grad=True, **kw)


@pytest.mark.parametrize("level, expected", [("quick", 1), ("default", 2), ("full", 8)])
def test_the_tuner_offers_gluon_dkdv_configs_on_sm90_where_they_fit(level, expected):
    """Backward buckets on the H100 get bwd_kernel="gluon" candidates (the dQ kernel keeps the
    base's blocks); none where the blocks do not divide the lengths, with features, at other
    head dims, or off sm_90 (those would only time the plain kernel again)."""
    from dataclasses import replace

    from fa2dispatch.autotune.space import candidates
    from fa2dispatch.hardware import simulated_device

    h100 = simulated_device("h100")

    def gluon(problem, device=h100, lvl=level):
        keep, pruned = candidates(problem, device, ["triton"], lvl)
        assert not [c for c, _ in pruned if c.config.bwd_kernel == "gluon"]
        return [c.config for c in keep if c.config.bwd_kernel == "gluon"]

    configs = gluon(_bwd_problem())
    assert len(configs) == expected
    for c in configs:
        assert c.dkdv_block_n == 16 * c.dkdv_num_warps and c.dkdv_block_m in (32, 64)
    assert len(gluon(_bwd_problem(D=64, dtype=torch.bfloat16))) == expected
    assert gluon(_bwd_problem(Mq=1000, Mkv=1000)) == []
    assert gluon(_bwd_problem(D=96)) == []
    assert gluon(_bwd_problem(window=(128, 0))) == []
    assert gluon(_bwd_problem(), replace(h100, capability=(8, 0), arch="sm_80")) == []


def test_problem_reasons_name_what_the_gluon_dkdv_kernel_cannot_take():
    from fa2dispatch.backends.triton_fa2 import launch_gluon_bwd
    from fa2dispatch.backends.triton_fa2.config import TritonConfig
    from fa2dispatch.hardware import simulated_device

    h100 = simulated_device("h100")
    good = TritonConfig(bwd_kernel="gluon", dkdv_block_m=32, dkdv_block_n=64, dkdv_num_warps=4)
    assert launch_gluon_bwd.problem_reasons(_bwd_problem(), good, h100) == []
    assert "Mq=1000" in " ".join(launch_gluon_bwd.problem_reasons(_bwd_problem(Mq=1000, Mkv=1000), good, h100))
    assert "D=96" in " ".join(launch_gluon_bwd.problem_reasons(_bwd_problem(D=96), good, h100))
    assert "softcap" in " ".join(launch_gluon_bwd.problem_reasons(_bwd_problem(softcap=30.0), good, h100))
    bad = TritonConfig(bwd_kernel="gluon", dkdv_block_m=32, dkdv_block_n=128, dkdv_num_warps=4)
    assert "dkdv_block_n=128" in " ".join(launch_gluon_bwd.problem_reasons(_bwd_problem(), bad, h100))
    assert "sm_90" in " ".join(launch_gluon_bwd.problem_reasons(_bwd_problem(), good, simulated_device("a100")))


@pytest.mark.gpu
def test_the_backend_backward_runs_the_gluon_dkdv_kernel_for_its_configs(monkeypatch):
    """TritonBackend.backward with a bwd_kernel="gluon" config: the Gluon dK/dV kernel runs
    (spied) and dq, dk, dv match float64; a call its blocks do not divide runs the plain kernel
    with the same blocks, and is right too."""
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.backends.triton_fa2 import launch_gluon_bwd
    from fa2dispatch.backends.triton_fa2.config import TritonConfig
    from fa2dispatch.problem import make_problem

    if device_info(torch.device("cuda")).capability != (9, 0):
        pytest.skip("the Gluon backward is sm_90 code")
    calls = []
    real = launch_gluon_bwd.run_dkdv
    monkeypatch.setattr(launch_gluon_bwd, "run_dkdv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    backend = BACKENDS["triton"]
    config = TritonConfig(block_m=64, block_n=64, num_warps=4, num_stages=2, dkdv_block_m=32, dkdv_block_n=64,
                          dq_block_m=64, dq_block_n=64, bwd_num_warps=4, bwd_num_stages=2, dkdv_num_warps=4,
                          bwd_kernel="gluon")
    for Mq, ran in ((512, [1]), (200, [])):
        calls.clear()
        case = Case(2, 4, 2, Mq, Mq, 128, torch.float16, True, "bshd")
        q, k, v, dout = make_inputs(case, device="cuda", seed=3, requires_grad=False)
        problem = make_problem(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), causal=True,
                               layout="bshd")
        q, k, v = (t.detach() for t in (q, k, v))
        out, lse = backend.forward(problem, q, k, v, config)
        grads = backend.backward(problem, dout, q, k, v, out, lse, config)
        torch.cuda.synchronize()
        truth = math_with_grads(q, k, v, dout, case, torch.float64)
        low = math_with_grads(q, k, v, dout, case, torch.float16)
        magnitude = max_magnitude(truth[0], *truth[2:])
        for name, ours, t, lp in zip(("dq", "dk", "dv"), grads, truth[2:], low[2:]):
            check_close(f"{name} (Mq={Mq})", ours, t, lp, magnitude)
        assert calls == ran, Mq
