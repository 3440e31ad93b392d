"""Properties of the installed package itself."""

from __future__ import annotations

import os
import subprocess
import sys


def test_import_does_not_import_triton_or_dynamo():
    """`import fa2dispatch` must leave Triton unimported: @triton.jit reads TRITON_INTERPRET when
    a module is imported, so a caller (or the CLI) must still be able to choose it afterwards.
    It also keeps `import fa2dispatch` cheap."""
    code = "import sys, fa2dispatch; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_demo_runs_without_a_gpu_or_preset_environment():
    """The README's first command: `fa2dispatch demo` on this machine, TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["COLUMNS"] = "200"  # rich wraps table cells to the terminal; a pipe has none
    out = subprocess.run([sys.executable, "-m", "fa2dispatch.cli", "demo"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # every call ran twice: through the dispatcher (the reference on CPU) and forced onto Triton
    rows = [line for line in out.stdout.splitlines() if "causal GQA 4:1" in line or "Mq != Mkv" in line]
    assert any("reference (default)" in r for r in rows) and any("triton (forced)" in r for r in rows), out.stdout
    assert "  with    reference  (default: " in out.stdout  # explain() text, printed verbatim


def test_shipped_layout_is_importable():
    import fa2dispatch.autotune_cache
    import fa2dispatch.backends.reference
    import fa2dispatch.backends.triton_fa2.kernels  # noqa: F401

    assert fa2dispatch.backends.reference.ReferenceBackend.name == "reference"
