"""Fallback: a backend that fails to compile or launch on a valid call hands over to the next
candidate, once-per-backend warning, the failure on record for the report; forced backends,
out-of-memory and invalid input never fall back."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import Case, make_inputs

import fa2dispatch
from fa2dispatch import dispatch
from fa2dispatch.backends import BACKENDS, PRIORITY
from fa2dispatch.backends.base import Backend
from fa2dispatch.backends.reference import attention_math

CASE = Case(1, 4, 2, 9, 13, 16, torch.float32, causal=True)


class FailingBackend(Backend):
    """Claims every CPU call, then fails as a kernel that does not compile would."""

    name = "failing"
    vendors = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, error: Exception | None = None, fail_forward=True):
        self.error = error or RuntimeError("injected: PTX assembly aborted\nsecond line")
        self.fail_forward = fail_forward
        self.calls = 0

    def forward(self, problem, q, k, v, config):
        self.calls += 1
        if self.fail_forward:
            raise self.error
        return BACKENDS["reference"].forward(problem, q, k, v, config)

    def backward(self, problem, dout, q, k, v, out, lse, config, dlse=None):
        self.calls += 1
        raise self.error


@pytest.fixture
def install(monkeypatch):
    """Register a failing backend first in the CPU priority, ahead of the reference."""

    def _install(backend: FailingBackend) -> FailingBackend:
        monkeypatch.setitem(BACKENDS, "failing", backend)
        monkeypatch.setitem(PRIORITY, "cpu", ("failing", "reference"))
        dispatch.clear_memo()
        dispatch.clear_failures()
        return backend

    yield _install
    dispatch.clear_memo()
    dispatch.clear_failures()


def _expected(q, k, v):
    out, _ = attention_math(q, k, v, causal=True, softmax_scale=CASE.D**-0.5)
    return out


def test_forward_failure_falls_back_warns_once_and_is_recorded(install, caplog):
    failing = install(FailingBackend())
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    assert fa2dispatch.explain(q, k, v, causal=True).backend.name == "failing"
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        first = fa2dispatch.attention(q, k, v, causal=True)
        second = fa2dispatch.attention(q, k, v, causal=True)
    torch.testing.assert_close(first, _expected(q, k, v), rtol=0, atol=0)
    assert torch.equal(first, second)
    assert failing.calls == 1  # the memo now skips the failing backend for this problem
    warnings = [r for r in caplog.records if r.name == "fa2dispatch"]
    assert len(warnings) == 1
    assert "backend failing failed in the forward (RuntimeError: injected: PTX assembly aborted)" in warnings[0].message
    assert "reference runs instead" in warnings[0].message

    decision = fa2dispatch.explain(q, k, v, causal=True)
    assert (decision.backend.name, decision.source) == ("reference", "fallback")
    assert decision.rejected["failing"] == [
        "failed at run time (forward): RuntimeError: injected: PTX assembly aborted"]
    assert "(fallback: the preferred backend failed at run time; next capable backend)" in str(decision)
    [record] = dispatch.failures()
    assert (record.backend, record.phase, record.replaced_by) == ("failing", "forward", "reference")
    assert record.error == "RuntimeError: injected: PTX assembly aborted"
    assert record.problem == decision.problem.describe()


def test_each_failing_problem_falls_back_but_warns_only_once(install, caplog):
    install(FailingBackend())
    with caplog.at_level(logging.WARNING, logger="fa2dispatch"):
        for mq in (5, 6, 7):
            q, k, v, _ = make_inputs(Case(1, 2, 2, mq, 8, 16, torch.float32, causal=False), requires_grad=False)
            fa2dispatch.attention(q, k, v)
    assert len([r for r in caplog.records if r.name == "fa2dispatch"]) == 1
    assert [f.problem.split()[3] for f in dispatch.failures()] == ["Mq=5", "Mq=6", "Mq=7"]


def test_backward_failure_falls_back_with_the_forwards_residuals(install):
    """The forward ran on 'failing' (fine), its backward fails: the reference's backward takes the
    same out and lse and the gradients are right."""
    install(FailingBackend(fail_forward=False))
    q, k, v, dout = make_inputs(CASE, seed=3)
    out = fa2dispatch.attention(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(_expected(*leaves), leaves, dout)
    for got, want in zip((dq, dk, dv), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    [record] = dispatch.failures()
    assert (record.backend, record.phase, record.replaced_by) == ("failing", "backward", "reference")


def test_nothing_left_to_fall_back_to_raises_the_original_error(install, monkeypatch):
    install(FailingBackend())
    monkeypatch.setitem(PRIORITY, "cpu", ("failing",))
    monkeypatch.setattr(BACKENDS["reference"], "not_supported_reasons", lambda p, d: ["disabled for this test"])
    monkeypatch.setattr(BACKENDS["triton"], "not_supported_reasons", lambda p, d: ["disabled for this test"])
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with pytest.raises(RuntimeError, match="injected: PTX assembly aborted"):
        fa2dispatch.attention(q, k, v, causal=True)
    [record] = dispatch.failures()
    assert record.replaced_by is None


def test_a_forced_backend_that_fails_raises(install):
    failing = install(FailingBackend())
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with pytest.raises(RuntimeError, match="injected: PTX assembly aborted"):
        fa2dispatch.attention(q, k, v, causal=True, backend="failing")
    with pytest.raises(RuntimeError, match="injected"), fa2dispatch.use_backend("failing"):
        fa2dispatch.attention(q, k, v, causal=True)
    assert failing.calls == 2
    assert fa2dispatch.explain(q, k, v, causal=True, backend="failing").source == "forced"


def test_out_of_memory_does_not_fall_back(install):
    install(FailingBackend(torch.cuda.OutOfMemoryError("injected: CUDA out of memory")))
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fa2dispatch.attention(q, k, v, causal=True)
    assert fa2dispatch.explain(q, k, v, causal=True).backend.name == "failing"


def test_invalid_input_raises_before_any_backend(install):
    failing = install(FailingBackend())
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    with pytest.raises(ValueError, match="head dims differ"):
        fa2dispatch.attention(q, k, v[..., :8], causal=True)
    with pytest.raises(TypeError, match="softmax_scale must be a float or None"):
        fa2dispatch.attention(q, k, v, softmax_scale="0.1")
    assert failing.calls == 0 and dispatch.failures() == []


def test_a_capability_check_that_raises_is_a_reason_not_a_crash(monkeypatch):
    def broken(problem, device):
        raise OSError("libcuda.so: cannot open shared object file")

    monkeypatch.setattr(BACKENDS["triton"], "not_supported_reasons", broken)
    dispatch.clear_memo()
    q, k, v, _ = make_inputs(CASE, requires_grad=False)
    decision = fa2dispatch.explain(q, k, v, causal=True)
    assert decision.backend.name == "reference"
    assert decision.rejected["triton"] == [
        "its capability check failed (OSError: libcuda.so: cannot open shared object file)"]
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call .*its capability check failed"):
        fa2dispatch.explain(q, k, v, causal=True, backend="triton")
    dispatch.clear_memo()
