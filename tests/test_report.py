"""The backend selection report and the ``report`` / ``info`` commands, on simulated devices.

Everything runs in-process on the CPU (one subprocess test checks the installed entry point);
a simulated profile takes this machine's library versions, so missing libraries are simulated
by patching ``hardware.versions``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from fa2dispatch import backends, cli, dispatch, hardware, report
from fa2dispatch.hardware import ENV_SIMULATE, PROFILES, Versions

FIELDS = [f.name for f in dataclasses.fields(hardware.DeviceInfo)]
BACKENDS = backends.BACKENDS


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """No simulation, forced backend or memoized decision from the caller's environment; the
    simulated profiles are rebuilt after a test patched the versions they copy."""
    for name in (ENV_SIMULATE, "FA2DISPATCH_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    dispatch.clear_memo()
    hardware.simulated_device.cache_clear()
    yield
    dispatch.clear_memo()
    hardware.simulated_device.cache_clear()


@pytest.fixture
def with_versions(monkeypatch):
    """Pretend triton and cupy are installed (a version string) or missing (None)."""

    def patch(triton: str | None, cupy: str | None) -> None:
        monkeypatch.setattr(hardware, "versions", lambda: Versions(torch=torch.__version__, triton=triton, cupy=cupy))
        hardware.simulated_device.cache_clear()

    return patch


def _rows(data: dict, **match) -> list[dict]:
    rows = [r for r in data["matrix"]["rows"] if all(r[k] == v for k, v in match.items())]
    assert rows, f"no matrix row matches {match}"
    return rows


def _backend_row(data: dict, name: str) -> dict:
    return next(r for r in data["backends"]["rows"] if r["name"] == name)


def _render(data: dict) -> str:
    out = io.StringIO()
    report.render(data, Console(file=out, width=160))
    return out.getvalue()


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_reports_device_backends_and_matrix(profile):
    dispatch.clear_failures()  # failures recorded by earlier tests in this worker are not this report's
    data = json.loads(json.dumps(report.collect(profile)))  # JSON-able as it is, no default= needed
    device = hardware.simulated_device(profile)
    dev = data["device"]
    assert data["simulate"] == profile and "error" not in dev
    for name in FIELDS:
        assert name in dev, name
    assert dev["name"] == PROFILES[profile].name and dev["arch"] == PROFILES[profile].arch
    assert dev["simulated"] is True and dev["key"] == device.key
    assert dev["versions"]["torch"] == torch.__version__
    for key in ("python", "platform", "TRITON_INTERPRET", "fa2dispatch", "torch_build", "env"):
        assert key in dev, key
    assert data["backends"]["family"] == backends.family(device)
    assert [r["name"] for r in data["backends"]["rows"]] == list(backends.priority(device))
    assert data["backends"]["order"] == list(backends.priority(device))
    assert len(data["matrix"]["rows"]) == len(report.calls())
    for row in data["matrix"]["rows"]:
        if row["dtype"] != "float8_e4m3fn":
            assert row["backend"] in BACKENDS, row
            assert row["call"].startswith(f"B=2 H={row['H']} Hkv={row['Hkv']} Mq={row['Mq']} Mkv={row['Mkv']}")
    assert data["failures"] == {"rows": []}
    assert "who runs what" in _render(data)


def test_matrix_covers_dtypes_head_dims_causal_lengths_passes_fp8_and_gqa():
    everything = report.collect("h100")["matrix"]["rows"]
    rows = [r for r in everything if r["pass"] in ("fwd", "fwd+bwd")]  # plain calls; features below
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16", "float32", "float8_e4m3fn"}
    assert {r["D"] for r in rows} == {64, 128, 256}
    assert {r["causal"] for r in rows} == {False, True}
    assert {(r["Mq"], r["Mkv"]) for r in rows} == {(1, 4096), (1024, 1024), (16384, 16384)}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {(r["H"], r["Hkv"]) for r in rows} == {(16, 16), (32, 8)}
    assert {r["pass"] for r in rows if r["dtype"] == "float8_e4m3fn"} == {"fwd"}
    features = {r["pass"] for r in everything} - {"fwd", "fwd+bwd"}
    for name in ("window", "softcap", "alibi", "dropout", "top_left", "varlen", "kvcache", "paged"):
        assert any(name in p for p in features), name


def test_feature_calls_go_to_backends_that_declare_them():
    """On the H100 every feature row runs on a backend whose capability data has the feature;
    top-left causal with Mq != Mkv may go to SDPA's kernels (their own alignment)."""
    data = report.collect("h100")
    for row in data["matrix"]["rows"]:
        if row["pass"] in ("fwd", "fwd+bwd"):
            continue
        if "top_left" in row["pass"]:
            assert row["backend"] in ("torch-sdpa-cudnn", "torch-sdpa-flash", "triton"), row
        else:
            assert row["backend"] == "triton", row
            assert any("not supported" in r for r in row["rejected"]["torch-sdpa-cudnn"]), row


def test_h100_half_precision_d128_forward_picks_cudnn_and_gqa_goes_to_triton():
    data = report.collect("h100")
    (row,) = _rows(data, dtype="float16", D=128, causal=False, Mq=1024, H=16, **{"pass": "fwd"})
    assert row["backend"] == "torch-sdpa-cudnn" and row["source"] == "default"
    assert row["fallbacks"][0] == "triton"
    for gqa in _rows(data, H=32, Hkv=8, **{"pass": "fwd"}) + _rows(data, H=32, Hkv=8, **{"pass": "fwd+bwd"}):
        assert gqa["backend"] == "triton"
        assert gqa["rejected"]["torch-sdpa-cudnn"] == ["GQA/MQA H=32 Hkv=8 (supported: H == Hkv)"]


def test_mi300x_picks_triton_with_amd_launch_fields():
    for row in _rows(report.collect("mi300x"), dtype="float16"):
        assert row["backend"] == "triton"
        fields = row["config_fields"]
        assert fields["waves_per_eu"] > 0 and fields["matrix_instr_nonkdim"] > 0 and fields["kpack"] > 0
        assert "waves_per_eu=" in row["config"]


def test_a100_fp8_has_no_backend_and_says_sm89():
    data = report.collect("a100")
    for row in _rows(data, dtype="float8_e4m3fn"):
        assert row["backend"] == "none" and row["config"] == "-" and row["error"] is None
        assert "requires sm_89+ but device is sm_80" in row["rejected"]["triton-fp8"]
        assert set(row["rejected"]) == set(BACKENDS)
    assert "requires sm_89+ but device is sm_80" in _render(data)


def test_cpu_profile_chooses_the_reference():
    for row in report.collect("cpu")["matrix"]["rows"]:
        if row["dtype"] != "float8_e4m3fn":
            assert row["backend"] == "reference", row


def test_forced_backend_is_reported_with_its_reasons(monkeypatch):
    monkeypatch.setenv("FA2DISPATCH_BACKEND", "triton")
    data = report.collect("a100")
    assert data["device"]["env"]["FA2DISPATCH_BACKEND"] == "triton"
    for row in data["matrix"]["rows"]:
        assert row["source"] == "forced" and row["error"] is None
        if row["dtype"] == "float8_e4m3fn":
            assert row["backend"] == "none"
            assert row["rejected"] == {"triton": ["dtype=float8_e4m3fn (supported: float16, bfloat16, float32)"]}
        else:
            assert row["backend"] == "triton"
    assert "none, see n1 (forced)" in _render(data)


def test_triton_missing(with_versions):
    with_versions(triton=None, cupy=None)
    data = report.collect("h100")
    for name in ("triton", "triton-fp8"):
        row = _backend_row(data, name)
        assert not row["available"] and "triton not installed" in row["reasons"]
    (row,) = _rows(data, dtype="float16", D=256, causal=False, Mq=1024, H=16, **{"pass": "fwd"})
    assert row["backend"] == "torch-sdpa-flash" and "triton not installed" in row["rejected"]["triton"]
    assert _rows(data, dtype="float32", D=64, Mq=1024, causal=True, H=16, **{"pass": "fwd"})[0]["backend"] == (
        "torch-sdpa-efficient")
    assert "triton not installed" in _render(data)


def test_cupy_missing_and_present(with_versions):
    with_versions(triton="3.6.0", cupy=None)
    assert "cupy not installed" in _backend_row(report.collect("a100"), "cupy")["reasons"]
    with_versions(triton="3.6.0", cupy="13.6.0")
    row = _backend_row(report.collect("a100"), "cupy")
    assert "cupy not installed" not in row["reasons"] and row["version"] == "cupy 13.6.0"


def test_a_raising_probe_still_yields_a_report(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("probe exploded\nsecond line")

    monkeypatch.setattr(report.platform, "platform", boom)
    monkeypatch.setattr(BACKENDS["cupy"], "available", boom)
    monkeypatch.setattr(dispatch, "failures", boom)
    data = json.loads(json.dumps(report.collect("h100")))
    assert data["device"]["platform"] == "error: RuntimeError: probe exploded"
    cupy = _backend_row(data, "cupy")
    assert cupy["available"] is False and cupy["reasons"] == ["error: RuntimeError: probe exploded"]
    # a broken backend is one more reason in each row; the others still decide every call
    rows = [r for r in data["matrix"]["rows"] if r["dtype"] != "float8_e4m3fn"]
    assert all(r["backend"] != "none" for r in rows)
    assert all(r["rejected"]["cupy"] == ["its capability check failed (RuntimeError: probe exploded)"] for r in rows)
    assert data["failures"] == {"error": "error: RuntimeError: probe exploded"}
    assert "probe exploded" in _render(data)


def test_no_device_at_all_still_yields_a_report(monkeypatch):
    def boom(simulate=None):
        raise OSError("driver gone")

    monkeypatch.setattr(hardware, "current_device", boom)
    data = json.loads(json.dumps(report.collect()))
    assert data["device"]["error"] == "error: OSError: driver gone"
    assert data["device"]["python"] and "driver gone" in data["backends"]["error"]
    assert "driver gone" in data["matrix"]["error"] and "driver gone" in data["autotune_cache"]["error"]
    assert "driver gone" in _render(data)
    assert any("driver gone" in line for line in report.summary_lines(report.collect_summary()))


def test_unknown_profile_in_the_environment_reports_the_real_device(monkeypatch):
    monkeypatch.setenv(ENV_SIMULATE, "bogus")
    data = report.collect()
    assert data["simulate"] is None and data["device"]["simulated"] is False
    assert f"{ENV_SIMULATE}='bogus' is not a known device profile" in data["device"]["error"]
    assert data["backends"]["rows"] and data["matrix"]["rows"]


def test_autotune_cache_section(monkeypatch):
    from fa2dispatch.autotune import cache

    files = report.collect("h100")["autotune_cache"]["files"]
    assert [f["origin"] for f in files] == ["user", "shipped"]
    assert all({"path", "exists", "entries", "match", "error"} <= set(f) for f in files)

    def boom(device):
        raise ValueError("cache unreadable")

    monkeypatch.setattr(cache, "describe", boom)
    data = report.collect("h100")
    assert data["autotune_cache"] == {"error": "error: ValueError: cache unreadable"}
    assert "cache unreadable" in _render(data)


def test_run_time_failures_are_listed(monkeypatch):
    failure = dispatch.Failure("triton", "forward", "RuntimeError: out of resources", "B=1 ...", "cpu [cpu]",
                               "reference")
    monkeypatch.setattr(dispatch, "failures", lambda: [failure])
    data = report.collect("cpu")
    assert data["failures"]["rows"] == [dataclasses.asdict(failure)]
    assert "triton (forward) on cpu [cpu]: RuntimeError: out of resources; reference ran instead" in _render(data)


def test_cli_report_json_is_the_collected_data_alone(capsys):
    assert cli.main(["report", "--json", "--simulate", "mi250x"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(json.dumps(report.collect("mi250x")))


def test_cli_report_rich(capsys):
    assert cli.main(["report", "--simulate", "a100"]) == 0
    out = capsys.readouterr().out
    for text in ("NVIDIA A100-SXM4-80GB", "backends in priority order", "who runs what", "autotune cache"):
        assert text in out, text


def test_cli_simulate_flag_wins_over_the_environment(capsys, monkeypatch):
    monkeypatch.setenv(ENV_SIMULATE, "a100")
    cli.main(["report", "--json"])
    assert json.loads(capsys.readouterr().out)["device"]["arch"] == "sm_80"
    cli.main(["report", "--json", "--simulate", "mi300x"])
    assert json.loads(capsys.readouterr().out)["device"]["arch"] == "gfx942"
    monkeypatch.setenv(ENV_SIMULATE, "bogus")
    cli.main(["info", "--simulate", "h100"])
    assert "[sm_90]" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["report", "--simulate", "bogus"], ["info", "--simulate", "bogus"],
                                  ["report", "--json"]])
def test_cli_unknown_profile_exits_2_with_one_line(argv, capsys, monkeypatch):
    monkeypatch.setenv(ENV_SIMULATE, "bogus")  # the flag's absence lets the environment speak
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1, captured.err
    source = "--simulate" if "--simulate" in argv else ENV_SIMULATE
    assert source in errors[0] and "'bogus'" in errors[0] and all(name in errors[0] for name in PROFILES)


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("fa2dispatch    0.1.0", "python ", "torch ", "triton", "cupy", "torch build", "device ",
                 "TRITON_INTERPRET=", "backend reference "):
        assert text in out, text
    assert cli.main(["info", "--simulate", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA GeForce RTX 4090 [sm_89]" in out and "(simulated)" in out
    lines = out.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("backend ")] == list(
        backends.priority(hardware.simulated_device("rtx4090")))


def test_report_entry_point_without_interpreter_or_gpu():
    """The installed command's path: stdout is exactly the JSON, with TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_SIMULATE, "FA2DISPATCH_BACKEND")}
    out = subprocess.run([sys.executable, "-m", "fa2dispatch.cli", "report", "--json"], capture_output=True,
                         text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert data["simulate"] is None and data["device"]["TRITON_INTERPRET"] is None
    if not torch.cuda.is_available():
        assert data["device"]["arch"] == "cpu"
        assert _backend_row(data, "triton")["reasons"] == [
            "CPU tensors run Triton only under the interpreter: set TRITON_INTERPRET=1"]
        assert _rows(data, dtype="float16")[0]["backend"] == "reference"
