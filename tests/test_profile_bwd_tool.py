"""tools/profile_bwd.py off the GPU: its arguments, its refusal without a GPU, and the per-call
summary of profiler events (fake events; the profiling itself needs a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("profile_bwd")


def _event(name, device, start, end):
    return SimpleNamespace(name=name, device_type=SimpleNamespace(name=device),
                           time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start))


def test_summary_per_call_leaves_out_host_events_and_copies(tool):
    events = [_event("attn_bwd_dkdv", "CUDA", 10, 40), _event("attn_bwd_dq", "CUDA", 45, 65),
              _event("aten::mul", "CPU", 0, 100), _event("Memcpy DtoD", "CUDA", 0, 5),
              _event("attn_bwd_dkdv", "CUDA", 110, 140), _event("attn_bwd_dq", "CUDA", 150, 170)]
    out = tool.summarize(events, calls=2)
    assert out["kernels"] == {"attn_bwd_dkdv": {"launches": 1.0, "us": 30.0},
                              "attn_bwd_dq": {"launches": 1.0, "us": 20.0}}
    assert out["span_us"] == (170 - 10) / 2  # includes the gaps between kernels and between calls
    assert tool.summarize([_event("aten::mul", "CPU", 0, 1)], calls=1) == {"calls": 1, "span_us": 0.0, "kernels": {}}


@pytest.mark.parametrize("argv, words", [(["--providers", "ours,flex"], ["--providers", "flex"]),
                                         (["--seqlen", "3000"], ["--seqlen 3000"]),
                                         (["--head-dim", "96"], ["--head-dim 96"]),
                                         (["--calls", "0"], ["--calls 0"])])
def test_bad_arguments_exit_2_naming_them(tool, argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tool, capsys):
    assert tool.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
