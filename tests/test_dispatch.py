"""The dispatcher on CPU: who runs a call, why, and what happens when nobody can.

Tests that need Triton to be able to run on CPU tensors (the interpreter) carry the
``interpreter`` marker; the rest make Triton unavailable themselves or only force backends.
"""

from __future__ import annotations

import re

import interpreter_fixes
import pytest
import torch
from helpers import Case, make_inputs

import fa2dispatch
from fa2dispatch import dispatch
from fa2dispatch.backends import BACKENDS, triton_fa2
from fa2dispatch.backends.reference import attention_math
from fa2dispatch.backends.triton_fa2.interpreter import bf16_defects
from fa2dispatch.backends.triton_fp8.interpreter import fp8_defects
from fa2dispatch.problem import AttentionProblem, make_problem

NO_INTERPRETER = "CPU tensors run Triton only under the interpreter: set TRITON_INTERPRET=1"
CASE = Case(1, 4, 2, 9, 13, 16, torch.float16, causal=True)


def _inputs(dtype=torch.float16, seed=0, requires_grad=False):
    case = Case(CASE.B, CASE.H, CASE.Hkv, CASE.Mq, CASE.Mkv, CASE.D, dtype, CASE.causal)
    return make_inputs(case, seed=seed, requires_grad=requires_grad)[:3]


@pytest.fixture(autouse=True)
def fresh_memo():
    """No decision leaks between tests (torn down after monkeypatch has undone its patches)."""
    dispatch.clear_memo()
    yield
    dispatch.clear_memo()


@pytest.fixture
def triton_unavailable(monkeypatch):
    """Triton as on a CPU process without TRITON_INTERPRET=1."""
    monkeypatch.setattr(triton_fa2, "_interpreting", lambda: False)
    dispatch.clear_memo()


@pytest.fixture
def unpatched_interpreter():
    """The interpreter with its bf16 and fp8 defects (triton#11584, triton#8322), as users have it."""
    was_installed = bool(interpreter_fixes._originals)
    interpreter_fixes.uninstall()
    bf16_defects.cache_clear()
    fp8_defects.cache_clear()
    dispatch.clear_memo()
    try:
        yield
    finally:
        if was_installed:
            interpreter_fixes.install()
        bf16_defects.cache_clear()
        fp8_defects.cache_clear()
        dispatch.clear_memo()


# ------------------------------------------------------------------ default choice on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_auto_picks_the_reference_on_cpu(dtype, layout):
    """On CPU the reference is first (250x faster than the interpreter, backends/__init__.py)."""
    q, k, v = _inputs(dtype)
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    decision = fa2dispatch.explain(q, k, v, causal=True, layout=layout)
    assert decision.backend is BACKENDS["reference"]
    assert (decision.source, decision.config) == ("default", None)
    assert decision.device.vendor == "cpu" and not decision.device.simulated
    assert decision.problem == make_problem(q, k, v, causal=True, layout=layout)
    gpu_only = {"cupy", "triton-fp8", "torch-sdpa-cudnn", "torch-sdpa-flash", "torch-sdpa-efficient"}
    assert set(decision.rejected) == gpu_only


@pytest.mark.interpreter
def test_triton_is_the_fallback_on_cpu_under_the_interpreter():
    decision = fa2dispatch.explain(*_inputs(), causal=True)
    assert decision.fallbacks == ("triton",)


def test_argument_forces_reference():
    q, k, v = _inputs()
    decision = fa2dispatch.explain(q, k, v, backend="reference")
    assert decision.backend is BACKENDS["reference"]
    assert decision.source == "forced"
    assert decision.config is None and decision.rejected == {}


@pytest.mark.interpreter
def test_argument_forces_triton():
    q, k, v = _inputs()
    decision = fa2dispatch.explain(q, k, v, backend="triton")
    assert (decision.backend.name, decision.source) == ("triton", "forced")


@pytest.mark.interpreter
def test_use_backend_forces_and_restores():
    q, k, v = _inputs()
    assert fa2dispatch.explain(q, k, v).backend.name == "reference"
    with fa2dispatch.use_backend("triton"):
        decision = fa2dispatch.explain(q, k, v)
        assert (decision.backend.name, decision.source) == ("triton", "forced")
        # an explicit argument still wins over the context
        assert fa2dispatch.explain(q, k, v, backend="reference").backend.name == "reference"
        with fa2dispatch.use_backend("auto"):
            inner = fa2dispatch.explain(q, k, v)
            assert (inner.backend.name, inner.source) == ("reference", "default")
        assert fa2dispatch.explain(q, k, v).backend.name == "triton"
    after = fa2dispatch.explain(q, k, v)
    assert (after.backend.name, after.source) == ("reference", "default")


@pytest.mark.interpreter
def test_use_backend_restores_after_an_exception():
    q, k, v = _inputs()
    with pytest.raises(RuntimeError, match="inside the block"):
        with fa2dispatch.use_backend("triton"):
            assert fa2dispatch.explain(q, k, v).backend.name == "triton"
            raise RuntimeError("inside the block")
    assert fa2dispatch.explain(q, k, v).source == "default"


def test_use_backend_runs_the_reference():
    q, k, v = _inputs(torch.float32)
    with fa2dispatch.use_backend("reference"):
        out = fa2dispatch.attention(q, k, v, causal=True)
    expected, _ = attention_math(q, k, v, causal=True, softmax_scale=CASE.D**-0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_environment_forces_reference(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "reference")
    dispatch.clear_memo()
    q, k, v = _inputs()
    decision = fa2dispatch.explain(q, k, v)
    assert (decision.backend.name, decision.source) == ("reference", "forced")


@pytest.mark.interpreter
def test_argument_and_context_win_over_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "reference")
    dispatch.clear_memo()
    q, k, v = _inputs()
    assert fa2dispatch.explain(q, k, v, backend="triton").backend.name == "triton"
    with fa2dispatch.use_backend("triton"):
        assert fa2dispatch.explain(q, k, v).backend.name == "triton"
    assert fa2dispatch.explain(q, k, v).backend.name == "reference"


# ------------------------------------------------------------------ a backend that cannot run


def test_forced_backend_that_cannot_run_raises_with_its_reasons(triton_unavailable, no_kernel_launch):
    q, k, v = _inputs()
    problem_text = re.escape(make_problem(q, k, v).describe())
    pattern = r"backend='triton' cannot run this call \(" + problem_text + r"\): " + re.escape(NO_INTERPRETER)
    with pytest.raises(ValueError, match=pattern):
        fa2dispatch.explain(q, k, v, backend="triton")
    with pytest.raises(ValueError, match=re.escape(NO_INTERPRETER)):
        fa2dispatch.attention(q, k, v, backend="triton")
    with fa2dispatch.use_backend("triton"), pytest.raises(ValueError, match=re.escape(NO_INTERPRETER)):
        fa2dispatch.attention(q, k, v)


def test_without_the_interpreter_triton_says_why(triton_unavailable):
    q, k, v = _inputs(torch.float32)
    decision = fa2dispatch.explain(q, k, v, causal=True)
    assert decision.backend is BACKENDS["reference"]
    assert decision.source == "default" and decision.fallbacks == ()
    assert decision.rejected["triton"] == [NO_INTERPRETER]
    out = fa2dispatch.attention(q, k, v, causal=True)
    expected, _ = attention_math(q, k, v, causal=True, softmax_scale=CASE.D**-0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.interpreter
def test_bf16_rejected_under_defective_interpreter(unpatched_interpreter, no_kernel_launch):
    """The library's own probe finds the defects the harness otherwise patches away."""
    defects = bf16_defects()
    assert any("triton#11584" in d for d in defects) and any("triton#8322" in d for d in defects)
    q, k, v = _inputs(torch.bfloat16)
    decision = fa2dispatch.explain(q, k, v, causal=True)
    assert (decision.backend.name, decision.source, decision.fallbacks) == ("reference", "default", ())
    reasons = decision.rejected["triton"]
    assert len(reasons) == 2 and all(r.startswith("dtype=bfloat16: ") for r in reasons)
    assert "triton#11584" in reasons[0] and "triton#8322" in reasons[1]
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call.*triton#11584.*triton#8322"):
        fa2dispatch.explain(q, k, v, causal=True, backend="triton")
    # only bf16 is affected
    assert fa2dispatch.explain(*_inputs(torch.float16), causal=True, backend="triton").source == "forced"


@pytest.mark.interpreter
def test_bf16_under_defective_interpreter_computes_with_reference(unpatched_interpreter):
    q, k, v = _inputs(torch.bfloat16)
    out = fa2dispatch.attention(q, k, v, causal=True)
    expected, _ = attention_math(q, k, v, causal=True, softmax_scale=CASE.D**-0.5)
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.interpreter
def test_bf16_accepted_by_patched_interpreter():
    bf16_defects.cache_clear()
    try:
        assert bf16_defects() == ()
        assert fa2dispatch.explain(*_inputs(torch.bfloat16)).fallbacks == ("triton",)
    finally:
        bf16_defects.cache_clear()


@pytest.mark.interpreter
def test_many_heads_run_on_triton_but_a_grid_past_2_31_programs_is_refused():
    """The kernels use a 1-D grid: batch x heads past gridDim.y's 65535 is fine; only more than
    2^31 - 1 programs in one launch is not."""

    def problem(B, H, M):
        return AttentionProblem(B=B, H=H, Hkv=H, Mq=M, Mkv=M, D=16, dtype=torch.float16,
                                device=torch.device("cpu"), layout="bshd", causal=False, softmax_scale=0.25)

    assert dispatch.select(problem(70000, 1, 4), "triton").source == "forced"
    huge = dispatch.select(problem(4096, 128, 1 << 20))  # CPU blocks of 16..32 rows: 2^34 programs
    assert huge.backend.name == "reference" and huge.fallbacks == ()
    assert huge.rejected["triton"][0] == ("B=4096 x H=128 x Mq=1048576 needs 17179869184 programs "
                                          "(supported: at most 2147483647)")
    # 2^20 rows x 128 heads x 16 dims is also 2^31 elements in one batch element: no reason of
    # its own, the kernels' row offsets are 64-bit
    assert len(huge.rejected["triton"]) == 1, huge.rejected["triton"]


# ------------------------------------------------------------------ nobody can run it


FP8 = "dtype=float8_e4m3fn (supported: float16, bfloat16, float32)"
FP8_16 = "dtype=float8_e4m3fn (supported: float16, bfloat16)"
GQA = "GQA/MQA H=4 Hkv=2 (supported: H == Hkv)"
CAUSAL = "bottom-right causal with Mq=9 != Mkv=13 (supported: causal when Mq == Mkv or Mq == 1)"
ALL_REASONS_FP8_CPU = {  # every reason of every backend, in the CPU priority order
    "reference": [FP8],
    "triton": [FP8],
    "cupy": ["runs on nvidia devices, not cpu", FP8_16],
    "triton-fp8": ["dtype=float8_e4m3fn: the Triton interpreter rounds fp32->fp8 casts wrongly (triton#8322)"],
    "torch-sdpa-cudnn": ["runs on nvidia devices, not cpu", FP8_16, GQA, CAUSAL],
    "torch-sdpa-flash": ["runs on nvidia/amd devices, not cpu", FP8_16, CAUSAL],
    "torch-sdpa-efficient": ["runs on nvidia/amd devices, not cpu", FP8, GQA, CAUSAL],
}


@pytest.mark.interpreter
def test_no_backend_error_lists_the_inputs_and_every_backend(no_kernel_launch, unpatched_interpreter):
    """fp8 inputs on CPU under the stock interpreter (its fp8 casts round wrongly): every
    backend refuses; the error is a NotImplementedError whose .reasons maps each backend (in
    the CPU priority order) to its reasons."""
    q, k, v = (t.to(torch.float8_e4m3fn) for t in _inputs(torch.float32))
    for call in (fa2dispatch.explain, fa2dispatch.attention):
        with pytest.raises(fa2dispatch.NoBackendError) as info:
            call(q, k, v, causal=True)
        err = info.value
        assert isinstance(err, NotImplementedError)
        assert err.reasons == ALL_REASONS_FP8_CPU
        assert list(err.reasons) == list(ALL_REASONS_FP8_CPU)
        lines = str(err).splitlines()
        assert lines[0] == (f"no fa2dispatch backend can run this call: "
                            f"{make_problem(q, k, v, causal=True).describe()} on cpu [cpu]")
        assert lines[1:5] == ["  reference:", f"    - {ALL_REASONS_FP8_CPU['reference'][0]}",
                              "  triton:", f"    - {ALL_REASONS_FP8_CPU['triton'][0]}"]
        assert len(lines) == 1 + len(ALL_REASONS_FP8_CPU) + sum(map(len, ALL_REASONS_FP8_CPU.values()))


@pytest.mark.parametrize(
    "field, value, reason",
    [("D", 320, "head_dim=320 (supported: 8..256, multiple of 8)"),
     ("D", 20, "head_dim=20 (supported: 8..256, multiple of 8)"),
     ("dtype", torch.float64, "dtype=float64 (supported: float16, bfloat16, float32)")],
    ids=["head_dim320", "head_dim20", "float64"],
)
def test_no_backend_error_names_the_limit(field, value, reason):
    """A problem past the limits of every backend that runs on CPU (built directly, past
    make_problem's validation): both list the reason text."""
    fields = dict(B=1, H=2, Hkv=2, Mq=3, Mkv=3, D=16, dtype=torch.float16, device=torch.device("cpu"),
                  layout="bshd", causal=False, softmax_scale=0.25)
    problem = AttentionProblem(**{**fields, field: value})
    with pytest.raises(fa2dispatch.NoBackendError) as info:
        dispatch.select(problem)
    assert set(info.value.reasons) == set(BACKENDS)
    assert reason in info.value.reasons["reference"]
    text = str(info.value)
    assert text.startswith(f"no fa2dispatch backend can run this call: {problem.describe()} on cpu [cpu]")
    assert text.index("  reference:") < text.index("  triton:")
    assert f"    - {reason}" in text


# ------------------------------------------------------------------ memo and explain text


def test_equal_problems_share_one_memoized_decision():
    q1, k1, v1 = _inputs(seed=0)
    q2, k2, v2 = _inputs(seed=1)  # other tensors, equal problem
    p1, p2 = make_problem(q1, k1, v1, causal=True), make_problem(q2, k2, v2, causal=True)
    assert p1 == p2 and p1 is not p2
    first = dispatch.select(p1)
    assert dispatch.select(p2) is first
    assert fa2dispatch.explain(q2, k2, v2, causal=True) is first
    assert dispatch.select(make_problem(q1, k1, v1, causal=False)) is not first
    assert dispatch.select(p1, "reference") is not first
    dispatch.clear_memo()
    again = dispatch.select(p1)
    assert again is not first and again == first


@pytest.mark.interpreter
def test_str_of_a_forced_triton_decision():
    q, k, v = _inputs()
    decision = fa2dispatch.explain(q, k, v, backend="triton")
    assert str(decision).splitlines() == [
        f"fa2dispatch runs {decision.problem.describe()}",
        "  on      cpu [cpu]",
        "  with    triton  (forced: forced by backend= / use_backend / FA2DISPATCH_BACKEND)",
        f"  config  {decision.config.short()}",
    ]
    assert "block_m=32 block_n=16" in str(decision)


def test_str_of_a_default_decision_lists_every_rejected_backend(triton_unavailable):
    q, k, v = _inputs()
    lines = str(fa2dispatch.explain(q, k, v)).splitlines()
    assert lines[1:5] == [
        "  on      cpu [cpu]",
        "  with    reference  (default: first capable backend in the device's priority order, default config)",
        "  config  -",
        "  not chosen:",
    ]
    assert lines[5] == f"    triton                {NO_INTERPRETER}"
    assert lines[6] == "    cupy                  runs on nvidia devices, not cpu"
    assert len(lines) == 5 + len(BACKENDS) - 1


@pytest.mark.interpreter
def test_backward_runs_on_the_backend_of_the_forward(monkeypatch):
    q, k, v, dout = make_inputs(CASE, seed=12)
    with fa2dispatch.use_backend("triton"):
        out = fa2dispatch.attention(q, k, v, causal=True)

    def reference_backward(*args, **kwargs):
        raise AssertionError("the forward ran on triton, the backward on reference")

    monkeypatch.setattr(BACKENDS["reference"], "backward", reference_backward)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_use_backend_auto_restores_automatic_choice_over_the_environment(monkeypatch):
    monkeypatch.setenv("FA2DISPATCH_BACKEND", "reference")
    dispatch.clear_memo()
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    assert fa2dispatch.explain(q, k, v).source == "forced"
    with fa2dispatch.use_backend("auto"):
        decision = fa2dispatch.explain(q, k, v)
    assert decision.source == "default" and decision.backend.name == "reference"


def test_devices_no_kernel_targets_get_the_reference_with_reasons():
    """meta (like mps or xpu) is no CPU: triton says why it is out, the reference runs."""
    q = torch.randn(1, 8, 2, 16, device="meta")
    decision = fa2dispatch.explain(q, q, q)
    assert decision.backend.name == "reference"
    assert decision.rejected["triton"] == ["runs on nvidia/amd/cpu devices, not meta"]
    out = fa2dispatch.attention(q, q, q)
    assert out.device.type == "meta" and out.shape == q.shape


@pytest.mark.interpreter
def test_torch_compile_bakes_in_the_backend_in_force_at_trace_time(monkeypatch):
    q, k, v, _ = make_inputs(CASE, seed=13, requires_grad=False)

    def no_reference(*args, **kwargs):
        raise AssertionError("use_backend('triton') was in force when the graph was traced")

    monkeypatch.setattr(BACKENDS["reference"], "forward", no_reference)
    compiled = torch.compile(lambda q, k, v: fa2dispatch.attention(q, k, v, causal=True), fullgraph=True,
                             backend="aot_eager")
    with fa2dispatch.use_backend("triton"):
        out = compiled(q, k, v)
    expected = fa2dispatch.attention(q, k, v, causal=True, backend="triton")
    assert torch.equal(out, expected)
