"""Missing optional dependencies: a fresh Python in which ``import triton`` and/or ``import cupy``
fail as they do where the package is not installed (``sys.modules[name] = None`` plus a finder
that refuses the package's modules; ``importlib.util.find_spec`` then answers None, as for a
missing package). In each: ``import fa2dispatch`` works, ``fa2dispatch report`` / ``info`` /
``demo`` / ``autotune --dry-run`` run and name the missing package as the reason, and
``fa2dispatch.attention`` on CPU tensors returns the right answer from the backend that can run.

"No CUDA" is this CPU-only torch build itself (CUDA_VISIBLE_DEVICES="" changes nothing on it);
every case also hides the devices a CUDA build would see, so a GPU machine runs the same CPU
checks. A CUDA build whose driver is broken is test_report.py's no-device case."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent('''
    import importlib.abc, sys

    BLOCKED = set(sys.argv[1].split(",")) - {""}

    class NotInstalled(importlib.abc.MetaPathFinder):
        """Refuses the blocked packages' modules as a missing package would."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for name in BLOCKED:
        sys.modules[name] = None  # `import name` raises ModuleNotFoundError; find_spec(name) is None
    sys.meta_path.insert(0, NotInstalled())
''')

PROBE = BLOCKER + textwrap.dedent('''
    import contextlib, dataclasses, io, json
    import torch

    import fa2dispatch  # the first thing that must work
    from fa2dispatch import cli, hardware
    from fa2dispatch.autotune.verify import within_tolerance
    from fa2dispatch.backends.reference import attention_math

    def run_cli(*argv):
        """(exit code, stdout); a command that raises gives ("raised", its last traceback line)."""
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code = cli.main(list(argv))
        except Exception as exc:
            return "raised", f"{type(exc).__name__}: {exc}"
        return code, out.getvalue()

    result = {"versions": dataclasses.asdict(hardware.versions())}
    code, text = run_cli("report", "--json")
    result["report"] = json.loads(text) if code == 0 else code
    code, text = run_cli("report", "--json", "--simulate", "h100")
    result["report_h100"] = json.loads(text) if code == 0 else code
    result["report_text"] = run_cli("report")
    result["info"] = run_cli("info")
    result["dry_run"] = run_cli("autotune", "--dry-run", "--dtype", "fp16", "--head-dim", "64", "--seqlen", "256",
                                "--mode", "fwd", "--causal", "true", "--simulate", "h100")
    # The demo also forces Triton on every call: interpreted, where Triton is there, it takes
    # seconds and test_package.py runs it; here it must refuse Triton and still pass.
    result["demo"] = run_cli("demo")[0] if "triton" in BLOCKED else None

    calls = []
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.float32):
        q, k, v = (torch.randn(1, 37, 4, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        decision = fa2dispatch.explain(q, k, v, causal=True)
        out = fa2dispatch.attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        truth = attention_math(*leaves, causal=True, softmax_scale=0.125, compute_dtype=torch.float64)[0]
        truth_grads = torch.autograd.grad(truth.sum(), leaves)
        low_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        low = attention_math(*low_leaves, causal=True, softmax_scale=0.125, compute_dtype=dtype)[0]
        low_grads = torch.autograd.grad(low.float().sum(), low_leaves)
        checks = [within_tolerance(o, t, l)[0] for o, t, l in zip((out, *grads), (truth, *truth_grads),
                                                                 (low, *low_grads))]
        calls.append({"dtype": str(dtype), "backend": decision.backend.name, "source": decision.source,
                      "rejected_triton": decision.rejected.get("triton"), "within_tolerance": checks})
        try:
            if "triton" in BLOCKED:
                fa2dispatch.attention(q, k, v, causal=True, backend="triton")
        except ValueError as exc:
            calls[-1]["forced_triton"] = str(exc)
    result["calls"] = calls
    result["imported"] = {name: sys.modules.get(name) is not None for name in ("triton", "cupy")}
    print("RESULT " + json.dumps(result, default=str))
''')


def probe(blocked: tuple[str, ...], **env_changes) -> dict:
    env = {**os.environ, "COLUMNS": "250", **env_changes}
    for name in ("FA2DISPATCH_BACKEND", "FA2DISPATCH_SIMULATE"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", PROBE, ",".join(blocked)], capture_output=True, text=True, env=env,
                          check=False,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def rows(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["backends"]["rows"]}


# Every case hides CUDA devices, so that a GPU machine runs the same CPU checks, and sets
# TRITON_INTERPRET=1: where Triton is missing, asking for its interpreter must not make anything
# import it; where it is there, a call forcing Triton runs interpreted.
NO_GPU = {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
CASES = {
    "no triton": (("triton",), NO_GPU),
    "no cupy": (("cupy",), NO_GPU),
    "no triton, no cupy": (("triton", "cupy"), NO_GPU),
}


@pytest.fixture(scope="module", params=CASES.values(), ids=CASES.keys())
def case(request):
    blocked, env = request.param
    return blocked, probe(blocked, **env)


def test_import_and_every_command_work(case):
    blocked, result = case
    assert not any(result["imported"][name] for name in blocked)  # the blocker held to the end
    missing = set(blocked) | {name for name in ("triton", "cupy") if importlib.util.find_spec(name) is None}
    assert {name for name in ("triton", "cupy") if result["versions"][name] is None} == missing
    assert isinstance(result["report"], dict) and isinstance(result["report_h100"], dict)
    assert result["report_text"][0] == 0 and result["info"][0] == 0
    assert result["demo"] == (0 if "triton" in blocked else None)  # its calls ran, matching float64
    assert "error" not in result["report"]["backends"] and "error" not in result["report"]["matrix"]


def test_autotune_dry_run_works(case, request):
    blocked, result = case
    code, text = result["dry_run"]
    assert code == 0, text
    assert "fwd/float16/d64/causal/g1/q256/k256" in text and "nothing runs" in text


def test_the_report_names_the_missing_package(case):
    """On this CPU: Triton's rows say "triton not installed" (a CPU backend, so that is the
    reason); on the simulated H100, whose backends are all NVIDIA ones, every backend that needs
    a blocked package says so. The rich report and `fa2dispatch info` print the same reasons."""
    blocked, result = case
    cpu, h100 = rows(result["report"]), rows(result["report_h100"])
    for name, package in (("triton", "triton"), ("triton-fp8", "triton"), ("cupy", "cupy")):
        if package in blocked:
            assert f"{package} not installed" in h100[name]["reasons"], (name, h100[name])
            assert not h100[name]["available"]
    if "triton" in blocked:
        assert cpu["triton"]["reasons"] == ["triton not installed"]
        assert cpu["triton"]["version"] == "-"
        assert "triton not installed" in result["report_text"][1]
        assert any(line.startswith("backend triton ") and line.endswith("unavailable: triton not installed")
                   for line in result["info"][1].splitlines())
    else:
        assert cpu["triton"]["available"] and h100["triton"]["available"]
    if "cupy" in blocked:
        assert cpu["cupy"]["reasons"] == ["runs on nvidia devices, not cpu"]  # the first reason on a CPU
        assert "cupy not installed" in json.dumps(result["report_h100"]["matrix"])
    assert "installed" in result["report"]["device"] and all(
        result["report"]["device"]["installed"][p] is None for p in blocked)


def test_calls_fall_back_to_what_can_run(case):
    """Every call of the report's matrix gets a backend that can run it, never one whose package
    is missing; on this CPU, attention itself (forward and backward, fp16 and fp32) runs on the
    reference and is right by STYLE.md's rule; forcing the missing Triton says why it cannot."""
    blocked, result = case
    needs = {"triton": "triton", "triton-fp8": "triton", "cupy": "cupy"}
    for report in (result["report"], result["report_h100"]):
        for row in report["matrix"]["rows"]:
            assert needs.get(row["backend"]) not in blocked, row
            if row["dtype"] != "float8_e4m3fn":
                assert row["backend"] != "none", row
    h100_fp16 = [r["backend"] for r in result["report_h100"]["matrix"]["rows"] if r["dtype"] == "float16"]
    assert set(h100_fp16) <= {"torch-sdpa-cudnn", "torch-sdpa-flash", "torch-sdpa-efficient", "triton", "cupy"}
    for call in result["calls"]:
        assert (call["backend"], call["source"]) == ("reference", "default")
        assert call["within_tolerance"] == [True] * 4, call
        if "triton" in blocked:  # refused with a ValueError, whatever its reason says
            assert "backend='triton' cannot run this call" in call["forced_triton"]


def test_a_call_says_triton_is_not_installed(case, request):
    """explain() and a call forcing Triton give the designed reason, not a failed import."""
    blocked, result = case
    if "triton" not in blocked:
        pytest.skip("Triton is installed in this case")
    for call in result["calls"]:
        assert call["rejected_triton"] == ["triton not installed"]
        assert "triton not installed" in call["forced_triton"]
    for row in result["report_h100"]["matrix"]["rows"]:  # the report's matrix says it per call
        assert "triton not installed" in row["rejected"].get("triton", []), row
