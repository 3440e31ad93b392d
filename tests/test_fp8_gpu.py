"""FP8 forward on a real GPU (sm_89 / sm_90): the STYLE.md rule with the fp8 emulation, at odd
lengths, causal, GQA, D 64/128/256, Mq != Mkv, NaN-poisoned outputs; pre-transposed V;
fp8=True and Hadamard; the refusal of backward. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, check_fp8, check_fp8_on_the_fly, make_fp8_inputs, make_inputs

import fa2dispatch
from fa2dispatch import dispatch

pytestmark = pytest.mark.gpu
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def needs_fp8_gpu():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    dispatch.clear_memo()
    yield
    dispatch.clear_memo()


CASES = [
    Case(2, 4, 4, 1000, 1000, 128, FP8, causal=False),
    Case(2, 4, 4, 1000, 1000, 128, FP8, causal=True),
    Case(1, 8, 2, 777, 1025, 64, FP8, causal=True),  # GQA, Mq < Mkv
    Case(1, 8, 1, 300, 97, 64, FP8, causal=True),  # MQA, Mq > Mkv: rows with no key
    Case(2, 2, 2, 513, 513, 256, FP8, causal=True, layout="bhsd"),
    Case(1, 4, 2, 257, 600, 256, FP8, causal=False),
    Case(1, 2, 2, 130, 190, 40, FP8, causal=False),  # padded head dim: pointer path
    Case(3, 6, 3, 4096, 4096, 128, FP8, causal=True),
    Case(1, 4, 4, 129, 129, 128, FP8, causal=False, contiguous=False),  # strided: pointer path
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fp8_forward_matches_the_rule(case, nan_poison):
    q8, k8, v8, qd, kd, vd = make_fp8_inputs(case, device="cuda")
    if not case.contiguous:  # every other byte of a wider last dim (uint8 ops: fp8 has few kernels)
        def strided(t):
            wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=torch.uint8, device=t.device)
            wide[..., ::2] = t.view(torch.uint8)
            return wide.view(FP8)[..., ::2]

        q8, k8, v8 = (strided(t) for t in (q8, k8, v8))
        assert q8.stride(-1) == 2
    out, lse = fa2dispatch.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=case.causal,
                                     layout=case.layout, return_lse=True)
    assert fa2dispatch.explain(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=case.causal,
                               layout=case.layout).backend.name == "triton-fp8"
    check_fp8(out, lse, q8, k8, v8, qd, kd, vd, causal=case.causal, layout=case.layout)


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_pretransposed_v_fp16_output_and_per_head_q_descale(tma, nan_poison):
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.backends.triton_fp8.launch import transpose_v

    from fa2dispatch.fp8 import FP8Args
    from fa2dispatch.problem import make_problem

    case = Case(2, 8, 2, 1000, 1111, 128, FP8, causal=True)
    q8, k8, v8, qd, kd, vd = make_fp8_inputs(case, device="cuda", q_per_head=True)
    vt = transpose_v(v8, case.layout)
    kw = {"q_descale": qd, "k_descale": kd, "v_descale": vd, "causal": True, "out_dtype": torch.float16}
    out = fa2dispatch.attention(q8, k8, vt, v_layout="transposed", **kw)
    check_fp8(out, None, q8, k8, v8, qd, kd, vd, causal=True, out_dtype=torch.float16)
    assert torch.equal(out, fa2dispatch.attention(q8, k8, v8, **kw))
    backend = BACKENDS["triton-fp8"]
    problem = make_problem(q8, k8, vt, causal=True, out_dtype=torch.float16, v_layout="transposed")
    from dataclasses import replace

    config = replace(backend.default_config(problem, fa2dispatch.dispatch.decide(problem, "auto").device), tma=tma)
    out2, _ = backend.forward(problem, q8, k8, vt, config, fp8_args=FP8Args(qd, kd, vd))
    check_fp8(out2, None, q8, k8, v8, qd, kd, vd, causal=True, out_dtype=torch.float16)


GLUON_CASES = [
    Case(2, 4, 4, 1024, 1024, 128, FP8, causal=False),
    Case(1, 8, 2, 640, 1025, 128, FP8, causal=True),  # GQA, Mq < Mkv, ragged last key block
    Case(1, 8, 1, 320, 97, 64, FP8, causal=True),  # MQA, Mq > Mkv: rows with no key
    Case(2, 4, 2, 512, 700, 64, FP8, causal=False, layout="bhsd"),
    Case(1, 4, 4, 384, 384, 128, FP8, causal=True, layout="bhsd"),
]


@pytest.mark.parametrize("case", GLUON_CASES, ids=lambda c: c.id)
def test_gluon_kernel_with_every_gluon_config(case, nan_poison):
    """The Gluon fp8 kernels (triton_fa2/kernels_gluon.py, the ping-pong kernel of
    kernels_gluon_ws.py where Mq is a multiple of 128) under each of their tuner configs: the
    STYLE.md rule for out and lse, natural and pre-transposed V, both output dtypes; and it is
    the kernel that ran (gluon_reasons empty), not the Triton fallback."""
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.backends.triton_fp8.launch import gluon_reasons, transpose_v

    from fa2dispatch.fp8 import FP8Args
    from fa2dispatch.hardware import device_info
    from fa2dispatch.problem import make_problem

    device = device_info(torch.device("cuda"))
    if not (9, 0) <= device.capability < (10, 0):
        pytest.skip(f"the Gluon kernel is sm_90 only (device {device.arch})")
    q8, k8, v8, qd, kd, vd = make_fp8_inputs(case, device="cuda")
    vt = transpose_v(v8, case.layout)
    backend = BACKENDS["triton-fp8"]
    for out_dtype in (torch.bfloat16, torch.float16):
        problem = make_problem(q8, k8, vt, causal=case.causal, layout=case.layout, out_dtype=out_dtype,
                               v_layout="transposed")
        configs = [c for c in backend.config_space(problem, device) if c.kernel in ("gluon", "gluon-pp")]
        pingpong = sum(c.kernel == "gluon-pp" for c in configs)
        # two ping-pong configs, each persistent and one CTA per tile (tile_grid 2 and 1)
        assert len(configs) - pingpong >= 2 and pingpong == (4 if case.Mq % 128 == 0 else 0)
        assert sorted(c.tile_grid for c in configs if c.kernel == "gluon-pp") == [1, 1, 2, 2][:pingpong]
        for config in configs:
            assert gluon_reasons(problem, q8, k8, vt, config, device) == [], config
            out, lse = backend.forward(problem, q8, k8, vt, config, fp8_args=FP8Args(qd, kd, vd))
            check_fp8(out, lse, q8, k8, v8, qd, kd, vd, causal=case.causal, layout=case.layout, out_dtype=out_dtype)
        natural = make_problem(q8, k8, v8, causal=case.causal, layout=case.layout, out_dtype=out_dtype)
        out2, _ = backend.forward(natural, q8, k8, v8, configs[0], fp8_args=FP8Args(qd, kd, vd))
        assert torch.equal(out2, backend.forward(problem, q8, k8, vt, configs[0], fp8_args=FP8Args(qd, kd, vd))[0])


def test_gluon_kernels_take_q_in_another_memory_order(nan_poison):
    """bshd views of bhsd-ordered memory (what a transpose of a bhsd tensor gives): a descriptor
    addresses them, and O, which goes back through q's row arguments, keeps q's memory order
    (a contiguous O here once put heads past the first in the wrong rows)."""
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.backends.triton_fp8.config import FP8Config
    from fa2dispatch.backends.triton_fp8.launch import gluon_reasons, transpose_v

    from fa2dispatch.fp8 import FP8Args
    from fa2dispatch.hardware import device_info
    from fa2dispatch.problem import make_problem

    device = device_info(torch.device("cuda"))
    if not (9, 0) <= device.capability < (10, 0):
        pytest.skip(f"the Gluon kernels are sm_90 only (device {device.arch})")
    case = Case(1, 4, 2, 512, 512, 128, FP8, causal=True, layout="bhsd")
    q8, k8, v8, qd, kd, vd = make_fp8_inputs(case, device="cuda")
    q8, k8, v8 = (t.transpose(1, 2) for t in (q8, k8, v8))  # bshd views, bhsd memory
    assert not q8.is_contiguous()
    vt = transpose_v(v8, "bshd")
    problem = make_problem(q8, k8, vt, causal=True, layout="bshd", v_layout="transposed")
    for config in (FP8Config(block_m=64, block_n=128, num_warps=4, num_stages=2, kernel="gluon", v_stages=1),
                   FP8Config(block_m=128, block_n=128, num_warps=12, num_stages=2, kernel="gluon-pp", v_stages=2)):
        assert gluon_reasons(problem, q8, k8, vt, config, device) == [], config
        out, lse = BACKENDS["triton-fp8"].forward(problem, q8, k8, vt, config, fp8_args=FP8Args(qd, kd, vd))
        check_fp8(out, lse, q8, k8, v8, qd, kd, vd, causal=True, layout="bshd")


def test_gluon_config_falls_back_to_the_triton_kernel_where_it_cannot_run(nan_poison):
    """A gluon config on a call the Gluon kernel refuses (Mq not a multiple of block_m, strided
    q) runs the Triton kernel with the same fields and is still right."""
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.backends.triton_fp8.config import FP8Config
    from fa2dispatch.backends.triton_fp8.launch import gluon_reasons, transpose_v

    from fa2dispatch.fp8 import FP8Args
    from fa2dispatch.hardware import device_info
    from fa2dispatch.problem import make_problem

    case = Case(1, 4, 2, 1000, 777, 128, FP8, causal=True)
    q8, k8, v8, qd, kd, vd = make_fp8_inputs(case, device="cuda")
    vt = transpose_v(v8, case.layout)
    problem = make_problem(q8, k8, vt, causal=True, layout=case.layout, v_layout="transposed")
    device = device_info(torch.device("cuda"))
    for config in (FP8Config(block_m=64, block_n=128, num_warps=4, num_stages=2, kernel="gluon", v_stages=1),
                   FP8Config(block_m=128, block_n=128, num_warps=12, num_stages=2, kernel="gluon-pp", v_stages=2)):
        assert any("Mq=1000" in r for r in gluon_reasons(problem, q8, k8, vt, config, device))
        out, lse = BACKENDS["triton-fp8"].forward(problem, q8, k8, vt, config, fp8_args=FP8Args(qd, kd, vd))
        check_fp8(out, lse, q8, k8, v8, qd, kd, vd, causal=True, layout=case.layout)


@pytest.mark.parametrize("use_hadamard", [False, True], ids=["plain", "hadamard"])
def test_fp8_true_and_hadamard(use_hadamard):
    case = Case(2, 8, 4, 1024, 1024, 128, torch.bfloat16, causal=True)
    q, k, v, _ = make_inputs(case, device="cuda", requires_grad=False)
    out = fa2dispatch.attention(q, k, v, causal=True, fp8=True, hadamard=use_hadamard)
    assert out.dtype == torch.bfloat16
    check_fp8_on_the_fly(out, q, k, v, causal=True, use_hadamard=use_hadamard)


def test_backward_through_fp8_is_refused():
    q, k, v = (torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="fp8 attention is forward-only"):
        fa2dispatch.attention(q, k, v, fp8=True)
    with torch.no_grad():
        assert fa2dispatch.attention(q, k, v, fp8=True).shape == q.shape
