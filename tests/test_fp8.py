"""FP8 (e4m3) attention on CPU: the kernel under the Triton interpreter (both load paths), the
API (descales, pre-transposed V, fp8=True, Hadamard), validation texts, selection on simulated
devices, and offline compilation for sm_89 / sm_90.

Accuracy follows STYLE.md's rule with the fp8 pipeline emulated in torch as "PyTorch in the same
precision" (tests/helpers.check_fp8). The interpreter's fp32->fp8 cast defect (triton#8322) is
patched in the harness (interpreter_fixes.py), never absorbed by a tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import interpreter_fixes
import pytest
import torch
from fa2dispatch.backends import BACKENDS
from fa2dispatch.backends.triton_fp8.config import FP8Config
from fa2dispatch.backends.triton_fp8.interpreter import fp8_defects
from helpers import Case, check_fp8, check_fp8_on_the_fly, make_fp8_inputs, make_inputs

import fa2dispatch
from fa2dispatch import dispatch
from fa2dispatch.fp8 import FP8Args, hadamard_rotation
from fa2dispatch.hardware import device_info, simulated_device
from fa2dispatch.problem import AttentionProblem, make_problem

FP8 = torch.float8_e4m3fn
BACKEND = BACKENDS["triton-fp8"]


@pytest.fixture(autouse=True)
def fresh_memo():
    dispatch.clear_memo()
    yield
    dispatch.clear_memo()


def check_fp8_case(case: Case, config: FP8Config | None = None, q_per_head=False, v_transposed=False,
                   out_dtype=torch.bfloat16, seed=0):
    """Run the fp8 kernel on one case and assert STYLE.md's rule against the fp8 emulation
    (helpers.check_fp8: output and lse, NaN-poisoned outputs included)."""
    q8, k8, v8, qd, kd, vd = make_fp8_inputs(case, seed=seed, q_per_head=q_per_head)
    v_in = v8
    if v_transposed:
        from fa2dispatch.backends.triton_fp8.launch import transpose_v

        v_in = transpose_v(v8, case.layout)
    problem = make_problem(q8, k8, v_in, causal=case.causal, layout=case.layout, out_dtype=out_dtype,
                           v_layout="transposed" if v_transposed else "natural")
    config = config or BACKEND.default_config(problem, device_info(q8.device))
    out, lse = BACKEND.forward(problem, q8, k8, v_in, config, fp8_args=FP8Args(qd, kd, vd))
    check_fp8(out, lse, q8, k8, v8, qd, kd, vd, causal=case.causal, layout=case.layout, out_dtype=out_dtype)
    return out, lse


CASES = [
    Case(1, 2, 2, 37, 45, 64, FP8, causal=False),
    Case(2, 4, 2, 33, 70, 64, FP8, causal=True),  # GQA, Mq < Mkv: bottom-right band
    Case(1, 3, 1, 50, 20, 32, FP8, causal=True),  # MQA, Mq > Mkv: first rows see no key
    Case(1, 2, 2, 17, 17, 40, FP8, causal=False, layout="bhsd"),  # padded head dim (40 -> 64)
    Case(1, 2, 1, 24, 31, 128, FP8, causal=True, layout="bhsd"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_the_fp8_rule(case, tma, nan_poison):
    check_fp8_case(case, FP8Config(block_m=16, block_n=32, num_warps=4, num_stages=1, tma=tma))


@pytest.mark.interpreter
def test_head_dim_256_and_large_blocks():
    check_fp8_case(Case(1, 1, 1, 40, 70, 256, FP8, causal=True), FP8Config(block_m=32, block_n=64, num_warps=4,
                                                                  num_stages=1, tma=True))


@pytest.mark.interpreter
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_pretransposed_v_per_query_head_descale_and_fp16_output(tma, layout, nan_poison):
    case = Case(2, 4, 2, 29, 53, 64, FP8, causal=True, layout=layout)
    config = FP8Config(block_m=16, block_n=32, num_warps=4, num_stages=1, tma=tma)
    a, lse_a = check_fp8_case(case, config, v_transposed=True, q_per_head=True, out_dtype=torch.float16)
    b, lse_b = check_fp8_case(case, config, v_transposed=False, q_per_head=True, out_dtype=torch.float16)
    assert torch.equal(a, b) and torch.equal(lse_a, lse_b)  # the same kernel on the same V^T


@pytest.mark.interpreter
def test_api_with_descales_is_deterministic_and_explains_itself():
    case = Case(1, 4, 2, 21, 34, 64, FP8, causal=True)
    q8, k8, v8, qd, kd, vd = make_fp8_inputs(case)
    kw = {"q_descale": qd, "k_descale": kd, "v_descale": vd, "causal": True}
    out, lse = fa2dispatch.attention(q8, k8, v8, return_lse=True, **kw)
    check_fp8(out, lse, q8, k8, v8, qd, kd, vd, causal=True)
    again = fa2dispatch.attention(q8, k8, v8, **kw)
    assert torch.equal(out, again)
    decision = fa2dispatch.explain(q8, k8, v8, **kw)
    assert decision.backend.name == "triton-fp8" and "out=bfloat16" in str(decision)
    # descales of 1 are the default
    ones = torch.ones(1, 2)
    assert torch.equal(fa2dispatch.attention(q8, k8, v8, causal=True),
                       fa2dispatch.attention(q8, k8, v8, causal=True, q_descale=ones, k_descale=ones, v_descale=ones))


@pytest.mark.interpreter
@pytest.mark.parametrize("use_hadamard", [False, True], ids=["plain", "hadamard"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_fp8_true_quantizes_on_the_fly(dtype, use_hadamard):
    """fp8=True equals quantize_fp8 (after the rotation) + the fp8 call, in the inputs' dtype,
    and is as close to the exact answer as quantization allows (helpers.check_fp8_on_the_fly)."""
    case = Case(1, 2, 2, 19, 27, 64, dtype, causal=True)
    q, k, v, _ = make_inputs(case, requires_grad=False)
    out = fa2dispatch.attention(q, k, v, causal=True, fp8=True, hadamard=use_hadamard)
    assert out.dtype == dtype and out.shape == q.shape
    decision = fa2dispatch.explain(q, k, v, causal=True, fp8=True, hadamard=use_hadamard)
    assert decision.backend.name == "triton-fp8" and decision.problem.output_dtype == dtype
    check_fp8_on_the_fly(out, q, k, v, causal=True, use_hadamard=use_hadamard)


def test_hadamard_rotation_is_orthogonal_deterministic_and_keeps_scores():
    r = hadamard_rotation(64)
    assert torch.allclose(r @ r.T, torch.eye(64), atol=1e-6)
    assert torch.equal(r, hadamard_rotation(64))
    q, k = torch.randn(2, 5, 3, 64), torch.randn(2, 7, 3, 64)
    s = torch.einsum("bmhd,bnhd->bhmn", q, k)
    sr = torch.einsum("bmhd,bnhd->bhmn", fa2dispatch.hadamard(q), fa2dispatch.hadamard(k))
    assert torch.allclose(s, sr, atol=1e-4)
    with pytest.raises(ValueError, match="hadamard: head dim D=40 is not a power of two"):
        hadamard_rotation(40)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_quantize_fp8(layout):
    x = torch.randn(2, 9, 3, 16) if layout == "bshd" else torch.randn(2, 3, 9, 16)
    x[0, ..., 0] = 0.0
    x8, d = fa2dispatch.quantize_fp8(x, layout=layout)
    assert x8.dtype == FP8 and x8.shape == x.shape and d.shape == (2, 3) and d.dtype == torch.float32
    back = x8.float() * (d[:, None, :, None] if layout == "bshd" else d[:, :, None, None])
    assert (back - x).abs().max() <= x.abs().max() * 2**-4  # e4m3: 3 mantissa bits
    amax = x.abs().amax(dim=(1, 3) if layout == "bshd" else (2, 3))
    assert torch.allclose(d, amax / 448)
    _, dt = fa2dispatch.quantize_fp8(x, granularity="per_tensor", layout=layout)
    assert dt.shape == (2, 3) and torch.all(dt == x.abs().max() / 448)
    zero8, zd = fa2dispatch.quantize_fp8(torch.zeros(1, 2, 1, 8))
    assert torch.all(zd == 1) and torch.all(zero8.float() == 0)
    with pytest.raises(ValueError, match="granularity='per_row' is not supported"):
        fa2dispatch.quantize_fp8(x, granularity="per_row")
    with pytest.raises(TypeError, match="quantize_fp8 takes float16, bfloat16 or float32"):
        fa2dispatch.quantize_fp8(x8)


# ------------------------------------------------------------------ validation (nothing launches)


def _fp8(shape_q=(1, 8, 4, 64), shape_kv=(1, 8, 2, 64)):
    return (torch.zeros(shape_q).to(FP8), torch.zeros(shape_kv).to(FP8), torch.zeros(shape_kv).to(FP8))


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"q_descale": torch.ones(1, 3)}, ValueError,
         r"q_descale \(shape \(1, 3\).*expected shape \(B, Hkv\) = \(1, 2\) or \(B, H\) = \(1, 4\)"),
        ({"k_descale": torch.ones(1, 4)}, ValueError, r"k_descale \(shape \(1, 4\).*expected shape \(B, Hkv\) = \(1, 2\)$"),
        ({"v_descale": torch.ones(1, 2, dtype=torch.float16)}, TypeError, r"v_descale .*must be float32"),
        ({"k_descale": torch.ones(1, 2, device="meta")}, ValueError, r"k_descale .*must be on q's device cpu"),
        ({"q_descale": [1.0]}, TypeError, r"q_descale must be a torch.Tensor or None, got list"),
        ({"out_dtype": torch.float32}, ValueError, r"out_dtype=torch.float32 is not supported"),
        ({"v_layout": "tn"}, ValueError, r"v_layout='tn' is not supported"),
        ({"fp8": True}, TypeError, r"fp8=True quantizes float16/bfloat16 inputs, but q .* is torch.float8_e4m3fn"),
        ({"hadamard": True}, ValueError, r"hadamard=True needs fp8=True"),
    ],
    ids=["q_descale-shape", "k_descale-shape", "v_descale-dtype", "descale-device", "descale-type", "out_dtype",
         "v_layout", "fp8-true-with-fp8", "hadamard-without-fp8"],
)
def test_fp8_validation_names_the_argument(kwargs, error, text, no_kernel_launch):
    q, k, v = _fp8()
    with pytest.raises(error, match=text):
        fa2dispatch.attention(q, k, v, **kwargs)


def test_q_descale_may_be_per_query_head(no_kernel_launch):
    q, k, v = _fp8()
    problem = make_problem(q, k, v)
    from fa2dispatch.fp8 import check_fp8_args

    args = check_fp8_args(problem, torch.ones(1, 4), torch.ones(1, 2), None)
    assert args.q_descale.shape == (1, 4) and args.v_descale is None


@pytest.mark.parametrize(
    "dtype, kwargs, error, text",
    [
        (torch.float16, {"q_descale": torch.ones(1, 2)}, ValueError,
         r"q_descale given but q is float16: descale factors apply to float8_e4m3fn inputs only"),
        (torch.float16, {"out_dtype": torch.float16}, ValueError, r"out_dtype applies to float8_e4m3fn inputs only"),
        (torch.bfloat16, {"v_layout": "transposed"}, ValueError, r"pre-transposed v applies to float8_e4m3fn"),
        (torch.float32, {"fp8": True}, TypeError, r"fp8=True quantizes float16/bfloat16 inputs, but q .* is torch.float32"),
        (torch.float16, {"fp8": True, "q_descale": torch.ones(1, 2)}, ValueError,
         r"fp8=True computes the scales itself .*: q_descale cannot be given"),
        (torch.float16, {"fp8": True, "hadamard": True}, ValueError, r"hadamard: head dim D=40 is not a power of two"),
        (torch.float16, {"fp8": "yes"}, TypeError, r"fp8 must be a bool, got str"),
    ],
    ids=["descale-fp16", "out_dtype-fp16", "v_layout-bf16", "fp8-fp32", "fp8-with-descale", "hadamard-d40",
         "fp8-str"],
)
def test_fp8_options_with_other_inputs(dtype, kwargs, error, text, no_kernel_launch):
    d = 40 if kwargs.get("hadamard") else 64
    q, k, v = (torch.zeros(1, 8, h, d, dtype=dtype) for h in (4, 2, 2))
    with pytest.raises(error, match=text):
        fa2dispatch.attention(q, k, v, **kwargs)


def test_transposed_v_shape_is_checked(no_kernel_launch):
    q, k, v = _fp8()
    with pytest.raises(ValueError, match=r"k and v must agree in heads and length"):
        fa2dispatch.attention(q, k, v, v_layout="transposed")  # natural v given as transposed
    vt = torch.zeros(1, 2, 64, 8).to(FP8)
    assert make_problem(q, k, vt, v_layout="transposed").v_layout == "transposed"


def test_backward_through_fp8_is_refused_before_anything_runs(no_kernel_launch):
    q, k, v = (t.float().requires_grad_() for t in _fp8())
    with pytest.raises(ValueError, match=r"fp8=True with inputs that require grad: fp8 attention is forward-only"):
        fa2dispatch.attention(q.half(), k.half(), v.half(), fp8=True)
    q8, k8, v8 = _fp8()
    try:
        q8.requires_grad_()
    except RuntimeError:
        pytest.skip("this torch does not let float8 tensors require grad")
    with pytest.raises(ValueError, match=r"q .* requires grad, but fp8 \(float8_e4m3fn\) attention is forward-only"):
        fa2dispatch.attention(q8, k8, v8)
    with torch.no_grad():  # inference: fine
        assert make_problem(q8, k8, v8).requires_grad is False


def test_memo_tells_descale_shapes_apart(no_kernel_launch):
    """A warm call with the same tensors but a wrong descale shape must still be refused."""
    q, k, v = _fp8()
    fa2dispatch.explain(q, k, v, q_descale=torch.ones(1, 2))
    with pytest.raises(ValueError, match="q_descale"):
        fa2dispatch.explain(q, k, v, q_descale=torch.ones(1, 3))
    with pytest.raises(ValueError, match="out_dtype"):
        fa2dispatch.explain(q, k, v, out_dtype=torch.float32)


def test_torch_compile_path_refuses_fp8(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k, v = _fp8()
    with pytest.raises(NotImplementedError, match="not supported under torch.compile"):
        fa2dispatch.attention(q, k, v)


# ------------------------------------------------------------------ selection and refusals


def _fp8_problem(**overrides) -> AttentionProblem:
    fields = {"B": 2, "H": 16, "Hkv": 16, "Mq": 4096, "Mkv": 4096, "D": 128, "dtype": FP8,
              "device": torch.device("cpu"), "layout": "bshd", "causal": False, "softmax_scale": 128**-0.5}
    return AttentionProblem(**{**fields, **overrides})


@pytest.mark.parametrize("profile", ["h100", "rtx4090"])
def test_fp8_is_chosen_on_sm89_and_sm90(profile):
    decision = dispatch.select(_fp8_problem(H=32, Hkv=8, causal=True), device=simulated_device(profile))
    assert decision.backend.name == "triton-fp8" and decision.source == "default"
    assert decision.config.tma == (profile == "h100")


@pytest.mark.parametrize("profile, arch", [("a100", "requires sm_89+ but device is sm_80"),
                                           ("mi300x", "fp8 e4m3fn on AMD gfx942 is not supported"),
                                           ("mi250x", "fp8 e4m3fn on AMD gfx90a is not supported")])
def test_fp8_is_refused_naming_the_arch(profile, arch):
    with pytest.raises(fa2dispatch.NoBackendError) as info:
        dispatch.select(_fp8_problem(), device=simulated_device(profile))
    assert info.value.reasons["triton-fp8"][0].startswith(arch)
    assert arch in str(info.value)


def test_simulated_a100_refuses_an_fp8_call(monkeypatch, no_kernel_launch):
    monkeypatch.setenv("FA2DISPATCH_SIMULATE", "a100")
    q, k, v = _fp8()
    with pytest.raises(fa2dispatch.NoBackendError, match="requires sm_89\\+ but device is sm_80"):
        fa2dispatch.attention(q, k, v)


@pytest.mark.interpreter
def test_unpatched_interpreter_refuses_fp8_with_the_reason():
    was_installed = bool(interpreter_fixes._originals)
    interpreter_fixes.uninstall()
    fp8_defects.cache_clear()
    dispatch.clear_memo()
    try:
        reasons = BACKEND.available(device_info(torch.device("cpu")))
        assert reasons == ["dtype=float8_e4m3fn: the Triton interpreter rounds fp32->fp8 casts wrongly (triton#8322)"]
    finally:
        if was_installed:
            interpreter_fixes.install()
        fp8_defects.cache_clear()
        dispatch.clear_memo()
    assert BACKEND.available(device_info(torch.device("cpu"))) == []


# ------------------------------------------------------------------ offline compilation


def _compile(target: str, head_dims: list[int], causal: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "fa2dispatch.backends.triton_fp8.offline", "--target", target,
           "--causal", "true" if causal else "false"]
    for d in head_dims:
        cmd += ["--head-dim", str(d)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"},
                          timeout=600, check=False)
    assert proc.returncode == 0, f"offline fp8 compile for {target} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.mark.compile
@pytest.mark.parametrize("target", ["sm_89", "sm_90"])
def test_fp8_kernel_compiles_with_fp8_tensor_core_instructions(target):
    rows = _compile(target, [64, 128, 256], causal=False) + _compile(target, [128], causal=True)
    for r in rows:
        print(f"{r['target']} D={r['head_dim']} causal={r['causal']} tma={r['tma']} "
              f"{r['shared_bytes'] / 1024:.1f} KiB of {r['smem_limit'] / 1024:.0f}  "
              f"{r['wgmma_fp8'] or r['mma_fp8']}  {r['config']}")
        where = f"{target} D={r['head_dim']} tma={r['tma']}"
        assert 0 < r["shared_bytes"] <= r["smem_limit"], f"{where}: {r['shared_bytes']} B of shared memory"
        assert not r["other_mma"], f"{where}: non-fp8 matrix instructions {r['other_mma']}"
        if target == "sm_90":  # Hopper: both matmuls on fp8 warpgroup MMAs, e.g. m64n128k32 e4m3.e4m3
            assert r["wgmma_fp8"], f"{where}: no wgmma.mma_async ... e4m3 in the PTX"
        else:  # Ada: fp8 mma.sync m16n8k32
            assert r["mma_fp8"] and not r["wgmma_fp8"], f"{where}: no fp8 mma.sync"
    if target == "sm_90":
        assert any(r["tma"] for r in rows), "the default sm_90 config compiles the descriptor (TMA) path"


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("shape", [(2, 3, 2, 40), (1, 130, 1, 72), (1, 17, 3, 256)], ids=str)
def test_transpose_v_is_an_exact_byte_copy(layout, shape):
    """V^T from the tiled kernel: every byte in place (odd lengths, head dims not a multiple of
    the tile, a strided input), the row stride padded to 16 and the padding outside the view."""
    from fa2dispatch.backends.triton_fp8.launch import transpose_v

    B, M, Hkv, D = shape
    g = torch.Generator().manual_seed(0)
    bytes_ = torch.randint(0, 255, (B, M, Hkv, 2 * D), generator=g, dtype=torch.uint8)
    v = bytes_[..., ::2].view(FP8)  # last-dim stride 2
    v = v if layout == "bshd" else v.transpose(1, 2)
    vt = transpose_v(v, layout)
    natural = v if layout == "bhsd" else v.transpose(1, 2)  # (B, Hkv, M, D)
    assert vt.shape == (B, Hkv, D, M) and vt.stride(3) == 1 and vt.stride(2) % 16 == 0
    assert torch.equal(vt.view(torch.uint8), natural.transpose(2, 3).view(torch.uint8))
