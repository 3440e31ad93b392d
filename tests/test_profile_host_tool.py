"""tools/profile_host.py off the GPU: its refusal without a GPU, its argument check, and the
host-time helper ``--breakdown`` uses (the order of its calls and syncs; the timings themselves
need a GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("profile_host")


def test_host_times_runs_idle_then_back_to_back(tool):
    """``calls`` runs each way; a sync before each idle run and after the back-to-back batch."""
    log = []
    idle, back = tool.host_times(lambda: log.append("call"), 4, lambda: log.append("sync"))
    assert log == ["sync", "call"] * 4 + ["sync"] + ["call"] * 4 + ["sync"]
    assert idle > 0 and back > 0


def test_without_a_gpu_it_says_so(tool, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the tool would run")
    assert tool.main(["--breakdown"]) == 2
    assert "needs a GPU" in capsys.readouterr().out


def test_calls_must_be_positive(tool, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(["--calls", "0"])
    assert exc.value.code == 2 and "--calls 0" in capsys.readouterr().err


def test_breakdown_times_each_layer_the_call_uses_and_restores_the_backends(tool, capsys):
    """On CPU (the wiring only): a reference call has no fast_launch layer; the backend's own
    forward is timed as the dispatcher called it, and every backend's method is put back."""
    from fa2dispatch.backends import BACKENDS

    import fa2dispatch

    q = torch.randn(1, 2, 16, 8)
    calls = []

    def fwd():
        calls.append(1)
        return fa2dispatch.attention(q, q, q, causal=True, layout="bhsd", backend="reference")

    assert tool.breakdown(fwd, 2, device="cpu") == 0
    out = capsys.readouterr().out
    assert "attention (the whole call)" in out and "reference.forward: the backend's own layer" in out
    assert "fast_launch" not in out and "one torch kernel" in out
    assert len(calls) == 3 + 2 * 2  # three warm-up calls, then the whole call idle and back to back
    assert not any("forward" in vars(b) for b in BACKENDS.values())
    assert "launch_gluon" not in out  # the reference launches no Gluon kernel
    from fa2dispatch.backends.triton_fa2 import launch_gluon

    assert launch_gluon.run_pingpong.__module__ == launch_gluon.__name__  # the spies are gone
    assert launch_gluon.run_forward.__module__ == launch_gluon.__name__
