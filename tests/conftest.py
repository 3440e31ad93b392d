"""Test harness: run Triton under the CPU interpreter when there is no GPU, patch the
interpreter's known defects (interpreter_fixes.py), and skip marked tests with a reason."""

from __future__ import annotations

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Must happen before fa2dispatch imports its kernels: @triton.jit reads it at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import interpreter_fixes  # noqa: E402

from fa2dispatch.backends.triton_fa2 import _interpreting  # noqa: E402

INTERPRETING = _interpreting()
if INTERPRETING:
    interpreter_fixes.install()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found); run tools/gpu_check.sh on one")
    skip_interp = pytest.mark.skip(
        reason="Triton kernels are compiled for the GPU in this process; interpreter tests run where "
        "TRITON_INTERPRET=1 (the default without a GPU)"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRETING:
            item.add_marker(skip_interp)


@pytest.fixture
def nan_poison(monkeypatch):
    """Make every torch.empty / torch.empty_like called from Python return NaN-filled memory,
    so an output element a kernel forgets to write shows up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(real_empty_like(*a, **kw)))
    yield



@pytest.fixture
def no_kernel_launch(monkeypatch):
    """Every backend's forward/backward fails the test, so a call that must be refused has to
    raise before any kernel; memoized decisions are not carried between tests."""
    from fa2dispatch import dispatch
    from fa2dispatch.backends import BACKENDS

    def launched(*args, **kwargs):
        raise AssertionError("kernel launched")

    for backend in BACKENDS.values():
        monkeypatch.setattr(backend, "forward", launched)
        monkeypatch.setattr(backend, "backward", launched)
    dispatch.clear_memo()
    yield
    dispatch.clear_memo()


@pytest.fixture(autouse=True)
def isolated_autotune_cache(tmp_path_factory, monkeypatch):
    """No test reads the user's cache or the shipped H100 results unless it asks for them:
    selection tests state the priority-order defaults. test_shipped_cache.py opts back in."""
    from fa2dispatch import dispatch
    from fa2dispatch.autotune import cache

    empty = tmp_path_factory.mktemp("autotune")
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(empty / "user"))
    monkeypatch.setattr(cache, "shipped_dir", lambda: empty / "shipped")
    cache.reload()
    dispatch.clear_memo()
    yield
    cache.reload()
    dispatch.clear_memo()
