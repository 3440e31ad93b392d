"""Faults of backends at run time, beyond test_fallback.py (which covers one failing backend in
the forward and the backward, the once-per-backend warning, out of memory and invalid input):
the real Triton backend failing to compile, a chain of failing backends, a tuned choice that
fails, what `fa2dispatch report` shows afterwards, and a forced backend that fails."""

from __future__ import annotations

import ast
import json
import logging

import pytest
import torch
from helpers import Case, check_close, make_inputs, math_with_grads, max_magnitude
from test_fallback import FailingBackend
from triton.compiler.errors import CompilationError

import fa2dispatch
from fa2dispatch import cli, dispatch, report
from fa2dispatch.autotune import cache
from fa2dispatch.autotune.buckets import bucket_of
from fa2dispatch.backends import BACKENDS, PRIORITY
from fa2dispatch.backends.reference import attention_math
from fa2dispatch.hardware import device_info

CASE = Case(1, 2, 2, 16, 16, 16, torch.float32, causal=True)
REASON = "arange's range must be a power of 2"


def compile_error():
    """What Triton raises when a kernel does not compile (triton.compiler.errors.CompilationError:
    "at LINE:COL:", the source line, then the reason on the last line)."""
    source = "offs = tl.arange(0, BLOCK_D)"
    return CompilationError(source, ast.parse(source).body[0], REASON)


class Uncompilable:
    """Makes one of our @triton.jit kernels fail to compile at launch (``kernel[grid](...)``),
    inside the real launcher; the kernel object stays what it was, so the backend still sees
    the interpreter and offers itself."""

    def __init__(self, monkeypatch, name: str):
        from fa2dispatch.backends.triton_fa2 import kernels

        self.launches = 0
        target = getattr(kernels, name)
        real = type(target).__getitem__

        def getitem(kernel, grid):
            if kernel is not target:
                return real(kernel, grid)

            def launch(*args, **kwargs):
                self.launches += 1
                raise compile_error()

            return launch

        monkeypatch.setattr(type(target), "__getitem__", getitem)


@pytest.fixture
def clean():
    dispatch.clear_memo()
    dispatch.clear_failures()
    yield
    dispatch.clear_memo()
    dispatch.clear_failures()


@pytest.fixture
def triton_first(monkeypatch, clean):
    """On CPU the reference comes first; put the real Triton backend (interpreted) ahead of it."""
    monkeypatch.setitem(PRIORITY, "cpu", ("triton", "reference"))
    dispatch.clear_memo()


def reference_out(q, k, v, causal=True):
    return attention_math(q, k, v, causal=causal, softmax_scale=q.shape[-1] ** -0.5)[0]


def report_text(capsys, monkeypatch) -> str:
    """`fa2dispatch report` as a user runs it (rich text, wide enough not to wrap)."""
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert cli.main(["report"]) == 0
    return capsys.readouterr().out


@pytest.mark.interpreter
def test_a_triton_kernel_that_does_not_compile_hands_over_and_the_report_says_so(triton_first, monkeypatch,
                                                                                 capsys, caplog):
    broken = Uncompilable(monkeypatch, "attn_fwd")
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    assert fa2dispatch.explain(q, k, v, causal=True).backend.name == "triton"
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        out = fa2dispatch.attention(q, k, v, causal=True)
        again = fa2dispatch.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, reference_out(q, k, v), rtol=0, atol=0)  # the reference ran it
    assert torch.equal(out, again) and broken.launches == 1  # the second call went straight to the reference
    [warning] = [r.getMessage() for r in caplog.records if r.name == "fa2dispatch"]
    assert "backend triton failed in the forward (CompilationError: " in warning
    assert "reference runs instead" in warning

    [failure] = report.collect()["failures"]["rows"]
    assert (failure["backend"], failure["phase"], failure["replaced_by"]) == ("triton", "forward", "reference")
    assert failure["error"].startswith("CompilationError: ") and failure["device"] == "cpu [cpu]"
    text = report_text(capsys, monkeypatch)
    assert "run-time failures in this process:" in text
    assert "triton (forward) on cpu [cpu]: CompilationError: " in text and "; reference ran instead; " in text
    assert fa2dispatch.explain(q, k, v, causal=True).problem.describe() in text  # which call failed


@pytest.mark.interpreter
def test_a_triton_backward_that_does_not_compile_hands_over_with_tritons_forward(triton_first, monkeypatch):
    """The forward ran on Triton (interpreted, for real); its backward kernels fail to compile:
    the reference's backward takes Triton's out and lse, and the gradients are right (STYLE.md's
    rule against float64)."""
    broken = Uncompilable(monkeypatch, "attn_bwd_dkdv")
    q, k, v, dout = make_inputs(CASE, seed=5)
    out = fa2dispatch.attention(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    truth = math_with_grads(q, k, v, dout, CASE, torch.float64)
    low = math_with_grads(q, k, v, dout, CASE, CASE.dtype)
    magnitude = max_magnitude(truth[0], *truth[2:])
    check_close("out", out, truth[0], low[0], magnitude)
    for name, ours, t, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), truth[2:], low[2:]):
        check_close(name, ours, t, lp, magnitude)
    [failure] = dispatch.failures()
    assert (failure.backend, failure.phase, failure.replaced_by) == ("triton", "backward", "reference")
    assert broken.launches == 1


class FailingToo(FailingBackend):
    name = "failing-too"


def test_a_chain_of_failing_backends_ends_on_the_first_that_runs(monkeypatch, clean, capsys, caplog):
    """Two backends fail in turn (a compile error, a launch error): the third runs the call,
    each failure is on record with who replaced it, one warning per backend."""
    first = FailingBackend(compile_error())
    second = FailingToo(RuntimeError("CUDA error: too many resources requested for launch"))
    monkeypatch.setitem(BACKENDS, "failing", first)
    monkeypatch.setitem(BACKENDS, "failing-too", second)
    monkeypatch.setitem(PRIORITY, "cpu", ("failing", "failing-too", "reference"))
    dispatch.clear_memo()
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        out = fa2dispatch.attention(q, k, v, causal=True)
        fa2dispatch.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, reference_out(q, k, v), rtol=0, atol=0)
    assert (first.calls, second.calls) == (1, 1)
    records = [(f.backend, f.error.split(":")[0], f.replaced_by) for f in dispatch.failures()]
    assert records == [("failing", "CompilationError", "failing-too"), ("failing-too", "RuntimeError", "reference")]
    assert len([r for r in caplog.records if r.name == "fa2dispatch"]) == 2
    decision = fa2dispatch.explain(q, k, v, causal=True)
    assert (decision.backend.name, decision.source) == ("reference", "fallback")
    assert set(decision.rejected) >= {"failing", "failing-too"}
    text = report_text(capsys, monkeypatch)
    assert "failing (forward) on cpu [cpu]: CompilationError: " in text and "; failing-too ran instead; " in text
    assert ("failing-too (forward) on cpu [cpu]: RuntimeError: CUDA error: too many resources requested for launch; "
            "reference ran instead; ") in text


def test_a_tuned_winner_that_fails_falls_back_like_a_default_choice(monkeypatch, clean):
    """Only a forced backend raises: a backend the autotune cache chose falls back too."""
    failing = FailingBackend()
    monkeypatch.setitem(BACKENDS, "failing", failing)
    monkeypatch.setitem(PRIORITY, "cpu", ("reference", "failing"))  # by priority, the reference would run
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    cpu = device_info(torch.device("cpu"))
    key = bucket_of(fa2dispatch.explain(q, k, v, causal=True).problem).key
    cache.store(cpu, {key: {"backend": "failing", "config": None, "ms": 0.1, "kernel_hash": None}}, cache.write_dir())
    dispatch.clear_memo()
    tuned = fa2dispatch.explain(q, k, v, causal=True)
    assert (tuned.backend.name, tuned.source) == ("failing", "tuned")
    out = fa2dispatch.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, reference_out(q, k, v), rtol=0, atol=0)
    assert failing.calls == 1
    [failure] = dispatch.failures()
    assert (failure.backend, failure.replaced_by) == ("failing", "reference")
    assert fa2dispatch.explain(q, k, v, causal=True).source == "fallback"


def test_the_failure_record_is_bounded(monkeypatch, clean):
    """A process with a broken backend and ever new shapes keeps the last 100 failures, not all."""
    monkeypatch.setitem(BACKENDS, "failing", FailingBackend())
    monkeypatch.setitem(PRIORITY, "cpu", ("failing", "reference"))
    dispatch.clear_memo()
    for mq in range(1, 131):
        q, k, v, _ = make_inputs(Case(1, 1, 1, mq, 4, 8, torch.float32, causal=False), requires_grad=False)
        fa2dispatch.attention(q, k, v)
    kept = dispatch.failures()
    assert len(kept) == 100
    assert [f.problem.split()[3] for f in kept[:1] + kept[-1:]] == ["Mq=31", "Mq=130"]


def test_an_interrupt_inside_a_backend_is_not_taken_for_a_failure(monkeypatch, clean):
    """Ctrl-C while a kernel runs must stop the program, not move the call to the next backend."""
    failing = FailingBackend(KeyboardInterrupt())
    monkeypatch.setitem(BACKENDS, "failing", failing)
    monkeypatch.setitem(PRIORITY, "cpu", ("failing", "reference"))
    dispatch.clear_memo()
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with pytest.raises(KeyboardInterrupt):
        fa2dispatch.attention(q, k, v, causal=True)
    assert dispatch.failures() == [] and fa2dispatch.explain(q, k, v, causal=True).backend.name == "failing"


# ------------------------------------------------------------------ a forced backend that fails


FORCES = ["argument", "use_backend", "environment"]


def forced_call(how: str, monkeypatch, q, k, v):
    if how == "argument":
        return fa2dispatch.attention(q, k, v, causal=True, backend="failing")
    if how == "use_backend":
        with fa2dispatch.use_backend("failing"):
            return fa2dispatch.attention(q, k, v, causal=True)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "failing")
    dispatch.clear_memo()
    return fa2dispatch.attention(q, k, v, causal=True)


@pytest.fixture
def forced_failing(monkeypatch, clean):
    failing = FailingBackend(compile_error())
    monkeypatch.setitem(BACKENDS, "failing", failing)
    monkeypatch.setitem(PRIORITY, "cpu", ("reference", "failing"))
    dispatch.clear_memo()
    return failing


@pytest.mark.parametrize("how", FORCES)
def test_a_forced_backend_that_fails_raises_its_error_and_is_on_record(forced_failing, monkeypatch, capsys, how):
    """Forced by the argument, by use_backend or by FA2DISPATCH_BACKEND: the kernel's own error
    (type kept, so callers can catch it) reaches the caller, nothing else runs, and the failure
    is listed by the report as raised."""
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with pytest.raises(CompilationError, match=REASON):
        forced_call(how, monkeypatch, q, k, v)
    assert forced_failing.calls == 1
    [failure] = dispatch.failures()
    assert (failure.backend, failure.phase, failure.replaced_by) == ("failing", "forward", None)
    rows = json.loads(json.dumps(report.collect()["failures"]["rows"]))
    assert rows == [{"backend": "failing", "phase": "forward", "error": failure.error, "problem": failure.problem,
                     "device": "cpu [cpu]", "replaced_by": None}]
    assert "failing (forward) on cpu [cpu]: CompilationError: " in report_text(capsys, monkeypatch)


@pytest.mark.parametrize("how", FORCES)
def test_a_forced_backend_failure_names_the_backend_and_why_nothing_took_over(forced_failing, monkeypatch, how):
    """The kernel's message alone ("at 1:0: ...") does not say which fa2dispatch backend ran
    or that no fallback was tried because the backend was forced."""
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with pytest.raises(CompilationError) as info:
        forced_call(how, monkeypatch, q, k, v)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "backend 'failing'" in notes and "forward" in notes and "forced" in notes


def test_the_recorded_error_of_a_compile_failure_says_why(forced_failing, monkeypatch):
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with pytest.raises(CompilationError):
        forced_call("argument", monkeypatch, q, k, v)
    [failure] = dispatch.failures()
    assert REASON in failure.error
