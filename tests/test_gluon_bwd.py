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
