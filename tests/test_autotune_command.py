"""The ``fa2dispatch autotune`` command, in-process on the CPU.

``--dry-run`` on every simulated profile (counts checked against ``space.candidates``,
nothing written, no kernel launched), a one-line exit-2 error for every bad flag, the
refusals of a real run, and one tiny real run under the Triton interpreter.
"""

from __future__ import annotations

import dataclasses

import json
import re
from collections import Counter

import pytest
import torch

from fa2dispatch import cli, dispatch
from fa2dispatch.autotune import cache, command, space, tuner
from fa2dispatch.autotune.buckets import bucket_of
from fa2dispatch.hardware import ENV_SIMULATE, PROFILES, simulated_device

# The dry run's lines: a bucket, a backend under it, a prune reason under that.
BUCKET = re.compile(r"^(\S+) \(B=\d+ H=\d+ Hkv=\d+\): (\d+) to time, (\d+) pruned")
BACKEND = re.compile(r"^  (\S+)\s+(\d+) to time(?:, (\d+) pruned)?$")
REASON = re.compile(r"^      (\d+) x (.+)$")
ABSENT = "  not capable"
FWD_D128 = "fwd/float16/d128/full/g1/q4096/k4096"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No simulation or forced backend from the caller's environment; the user cache
    dir and the shipped cache are folders under tmp_path."""
    for name in (ENV_SIMULATE, "FA2DISPATCH_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path / "user"))
    monkeypatch.setattr(cache, "shipped_dir", lambda: tmp_path / "shipped")
    monkeypatch.setenv("COLUMNS", "200")  # rich folds table cells at the default 80
    cache.reload()
    dispatch.clear_memo()
    yield
    cache.reload()
    dispatch.clear_memo()


def autotune(*args: str) -> int:
    return cli.main(["autotune", *args])


def parse(out: str) -> dict[str, dict]:
    """The dry run's bucket blocks: {key: {kept, pruned, backends, reasons, absent}}."""
    buckets: dict[str, dict] = {}
    for line in out.splitlines():
        if m := BUCKET.match(line):
            block = buckets[m[1]] = {"kept": int(m[2]), "pruned": int(m[3]),
                                     "backends": {}, "reasons": Counter(), "absent": []}
        elif m := BACKEND.match(line):
            name = m[1]
            block["backends"][name] = (int(m[2]), int(m[3] or 0))
        elif m := REASON.match(line):
            block["reasons"][(name, m[2])] = int(m[1])
        elif line.startswith(ABSENT):
            block["absent"] = line[len(ABSENT):].strip().split(", ")
    return buckets


def expected(grid: tuner.Grid, device) -> dict[str, dict]:
    """The same blocks, computed from the search-space API."""
    where = torch.device("cuda") if device.is_gpu else torch.device("cpu")
    out = {}
    names = grid.backends
    for problem in grid.problems(where):
        keep, pruned = space.candidates(problem, device, list(names), grid.level)
        kept = Counter(c.backend for c in keep)
        cut = Counter(c.backend for c, _ in pruned)
        out[bucket_of(problem).key] = {
            "kept": len(keep), "pruned": len(pruned),
            "backends": {n: (kept[n], cut[n]) for n in names if kept[n] or cut[n]},
            "reasons": Counter((c.backend, reason) for c, reason in pruned),
            "absent": [n for n in names if not kept[n] and not cut[n]],
        }
    return out


def check_dry_run(capsys, tmp_path, grid, device, *flags: str) -> dict[str, dict]:
    """Run --dry-run with ``flags``; its blocks must be the API's for ``grid``."""
    out_dir = tmp_path / "out"
    assert autotune("--dry-run", "--cache-dir", str(out_dir), *flags) == 0
    out = capsys.readouterr().out
    blocks, want = parse(out), expected(grid, device)
    assert blocks == want
    assert list(blocks) == list(want)  # one block per bucket, in the tuner's order
    n = len(want)
    total = (f"total: {n} bucket{'s' * (n != 1)}, "
             f"{sum(b['kept'] for b in want.values())} candidates to time, "
             f"{sum(b['pruned'] for b in want.values())} pruned")
    assert total in out.splitlines()
    assert f"results would be written to {out_dir / cache.file_name(device)}" in out
    assert not out_dir.exists() and not (tmp_path / "user").exists()  # nothing written
    return blocks


def h100_blocks(capsys, tmp_path) -> dict[str, dict]:
    h100 = simulated_device("h100")
    return check_dry_run(capsys, tmp_path, tuner.Grid(), h100, "--simulate", "h100")


# ------------------------------------------------------------------ --dry-run


@pytest.mark.parametrize("profile", list(PROFILES))
def test_dry_run_matches_the_search_space_on_every_profile(profile, capsys, tmp_path,
                                                          no_kernel_launch):
    device = simulated_device(profile)
    check_dry_run(capsys, tmp_path, tuner.Grid(), device, "--simulate", profile)


def test_h100_forward_bucket_lists_sdpa_and_triton(capsys, tmp_path, no_kernel_launch):
    fwd = h100_blocks(capsys, tmp_path)[FWD_D128]["backends"]
    sdpa = {"torch-sdpa-cudnn", "torch-sdpa-flash", "torch-sdpa-efficient"}
    assert sdpa | {"triton"} <= set(fwd)
    assert fwd["triton"][0] > 1  # a config space, not one candidate


def test_mi300x_has_its_own_space_and_no_cudnn(capsys, tmp_path, no_kernel_launch):
    mi300x = simulated_device("mi300x")
    amd = check_dry_run(capsys, tmp_path, tuner.Grid(), mi300x, "--simulate", "mi300x")
    amd, nvidia = amd[FWD_D128], h100_blocks(capsys, tmp_path)[FWD_D128]
    assert "torch-sdpa-cudnn" not in amd["backends"]
    assert "torch-sdpa-cudnn" in amd["absent"]
    # AMD's space adds waves_per_eu, the MFMA shape and kpack: not NVIDIA's count.
    assert amd["backends"]["triton"] != nvidia["backends"]["triton"]


@pytest.mark.parametrize("profile", ["rtx4090", "mi300x"])
def test_prune_reasons_are_grouped_with_counts(profile, capsys, tmp_path,
                                               no_kernel_launch):
    # fp32 at D=256: large blocks overflow 99 KiB (Ada) and 64 KiB (CDNA) per block.
    flags = ("--full", "--dtype", "fp32", "--head-dim", "256",
             "--seqlen", "4096,1x4096", "--mode", "bwd,fwd", "--causal", "true")
    grid = tuner.Grid(extras=(), dtypes=("float32",), head_dims=(256,), causal=(True,),
                      lengths=((4096, 4096), (1, 4096)), level="full")  # fwd first
    blocks = check_dry_run(capsys, tmp_path, grid, simulated_device(profile),
                           "--simulate", profile, *flags)
    reasons = [reason for block in blocks.values() for _, reason in block["reasons"]]
    assert any("shared memory" in reason for reason in reasons)


def test_flags_shape_the_grid(capsys, tmp_path, no_kernel_launch):
    grid = tuner.Grid(extras=(), dtypes=("bfloat16", "float16"), head_dims=(64, 96),
                      causal=(True,), lengths=((4096, 4096), (1, 8192)), modes=("fwd",),
                      backends=("triton", "torch-sdpa-flash"), level="quick")
    a100 = simulated_device("a100")
    check_dry_run(capsys, tmp_path, grid, a100, "--simulate", "a100", "--quick",
                  "--dtype", "bfloat16,fp16,bf16", "--head-dim", "64,96",
                  "--causal", "TRUE", "--seqlen", "4096, 1x8192", "--mode", "fwd",
                  "--backends", "triton,torch-sdpa-flash")


def test_dry_run_marks_fresh_buckets_until_forced(capsys, tmp_path, no_kernel_launch):
    device, key = simulated_device("h100"), "fwd/float16/d64/causal/g1/q1024/k1024"
    entry = {"backend": "torch-sdpa-cudnn", "config": None,
             "versions": cache.soft_stamp(device)}
    cache.store(device, {key: entry}, tmp_path / "user")
    flags = ("--dry-run", "--simulate", "h100", "--dtype", "fp16", "--head-dim", "64",
             "--seqlen", "1024", "--mode", "fwd")
    assert autotune(*flags) == 0
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if "skipped without --force" in line]
    assert len(marked) == 2 and marked[0].startswith(key + " ")  # the bucket, the total
    assert "; 1 bucket fresh in the cache (skipped without --force)" in marked[1]
    assert autotune(*flags, "--force") == 0
    assert "skipped without --force" not in capsys.readouterr().out


def no_user_dir():
    raise cache.CacheError("no user cache dir: platformdirs not installed")


def test_dry_run_without_a_user_cache_dir_says_why(capsys, monkeypatch,
                                                   no_kernel_launch):
    monkeypatch.setattr(cache, "user_dir", no_user_dir)
    assert autotune("--dry-run", "--simulate", "cpu", "--seqlen", "1024") == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "results could not be stored: no user cache dir: platformdirs not installed "
        "(pass --cache-dir PATH)")


# ------------------------------------------------------------------ errors: exit 2


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flags, words", [
    (["--dtype", "fp64"], ["--dtype", "dtype='fp64'", "fp16, bf16, fp32"]),
    (["--dtype", "fp16,"], ["--dtype", "empty item"]),
    (["--head-dim", "12"], ["--head-dim", "head_dim=12 (supported: 8..256, multiple"]),
    (["--head-dim", "264"], ["--head-dim", "head_dim=264"]),
    (["--seqlen", "0"], ["--seqlen", "seqlen='0'"]),
    (["--seqlen", "1x0"], ["--seqlen", "seqlen='1x0'"]),
    (["--seqlen", "2x3x4"], ["--seqlen", "MqxMkv"]),
    (["--mode", "up"], ["--mode", "mode='up' (supported: fwd, bwd)"]),
    (["--causal", "maybe"], ["--causal", "causal='maybe' (supported: true, false,"]),
    (["--backends", "nope"], ["--backends", "backend='nope' (registered: triton,"]),
    (["--runs", "5"], ["--runs", "runs=5 (supported: an integer >= 20)"]),
    (["--jobs", "-1"], ["--jobs", "jobs=-1 (supported: an integer >= 0"]),
    (["--jobs", "two"], ["--jobs", "jobs=two"]),
    (["--group", "0"], ["--group", "group='0' (supported: an integer >= 1"]),
    (["--simulate", "bogus"], ["--simulate", "'bogus'"]),
    (["--quick", "--full"], ["--full", "--quick"]),
])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(flags, words, capsys,
                                                        no_kernel_launch):
    with pytest.raises(SystemExit) as exc:
        autotune("--dry-run", *flags)
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert line.startswith(f"fa2dispatch autotune: error: argument {words[0]}")
    for word in words[1:]:
        assert word in line


def test_a_simulated_device_cannot_be_timed(capsys, monkeypatch, no_kernel_launch):
    with pytest.raises(SystemExit) as exc:
        autotune("--simulate", "h100")
    assert exc.value.code == 2
    assert one_error_line(capsys) == (
        "fa2dispatch autotune: error: --simulate=h100: a simulated device cannot be "
        "timed (add --dry-run to see its search space)")
    monkeypatch.setenv(ENV_SIMULATE, "a100")
    with pytest.raises(SystemExit) as exc:
        autotune()
    assert exc.value.code == 2
    assert f"error: {ENV_SIMULATE}=a100: a simulated device" in one_error_line(capsys)
    monkeypatch.setenv(ENV_SIMULATE, "z80")
    with pytest.raises(SystemExit) as exc:
        autotune("--dry-run")
    assert exc.value.code == 2
    assert f"{ENV_SIMULATE}='z80' is not a known" in one_error_line(capsys)


def on_cpu(simulate=None):
    return PROFILES["cpu"]


def test_cpu_without_the_interpreter_is_refused(capsys, monkeypatch, no_kernel_launch):
    from fa2dispatch.backends import triton_fa2

    monkeypatch.setattr(command, "current_device", on_cpu)
    monkeypatch.setattr(triton_fa2, "_interpreting", lambda: False)
    with pytest.raises(SystemExit) as exc:
        autotune("--seqlen", "1024")
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert "no GPU here" in line and "TRITON_INTERPRET=1" in line


def test_a_run_without_a_cache_dir_is_refused(capsys, monkeypatch, no_kernel_launch):
    monkeypatch.setattr(command, "current_device", on_cpu)
    monkeypatch.setattr(command, "_timer", lambda device, runs, parser: None)
    monkeypatch.setattr(cache, "user_dir", no_user_dir)
    with pytest.raises(SystemExit) as exc:
        autotune("--seqlen", "1024")
    assert exc.value.code == 2
    assert "nowhere to store results (no user cache dir" in one_error_line(capsys)


# ------------------------------------------------------------------ a real run


def test_short_config_shows_what_the_bucket_varied():
    from fa2dispatch.backends.triton_fa2.config import TritonConfig

    config = TritonConfig(block_m=128, block_n=64, num_warps=4, num_stages=3,
                          dkdv_block_m=32, dkdv_block_n=128, dq_block_m=128,
                          dq_block_n=32).as_dict()
    assert command._short("fwd", config) == "128x64 w4 s3"
    assert command._short("bwd", config) == "dkdv 32x128 dq 128x32 w4 s2"
    amd = {**config, "waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 1}
    assert command._short("fwd", amd) == "128x64 w4 s3 wpe2 mfma16 kpack1"
    assert command._short("fwd", None) == ""
    # a CupyConfig has block_m but no num_stages (session 10: the table raised KeyError at the end
    # of a re-tune whose winner was the CuPy backend, after every bucket had been tuned)
    from fa2dispatch.backends.cupy_cuda.config import CupyConfig

    cupy = dataclasses.asdict(CupyConfig(fwd_kernel="wgmma", block_m=64, block_n=64, num_warps=4, fwd_stages=4))
    text = command._short("fwd", cupy)
    assert "block_m=64" in text and "fwd_kernel=wgmma" in text and "fwd_stages=4" in text, text


def table_row(out: str, key: str) -> str:
    return next(line for line in out.splitlines() if key in line and "│" in line)


@pytest.mark.interpreter
def test_a_tiny_real_run_under_the_interpreter(capsys, tmp_path, monkeypatch):
    # The tuner's problems hold 16,384 tokens (BENCH_PROTOCOL.md): far too many for
    # the interpreter.
    monkeypatch.setattr(tuner, "TOKENS", 64)
    monkeypatch.setattr(tuner, "HIDDEN", 32)
    flags = ("--dtype", "fp16", "--head-dim", "16", "--seqlen", "32", "--causal",
             "true", "--mode", "fwd", "--backends", "triton,reference", "--quick",
             "--runs", "20", "--cache-dir", str(tmp_path / "tuned"))
    key = "fwd/float16/d16/causal/g1/q32/k32"
    assert autotune(*flags) == 0
    out = capsys.readouterr().out
    path = tmp_path / "tuned" / cache.file_name(command.current_device())
    entry = json.loads(path.read_text())["entries"][key]
    assert {t["backend"] for t in entry["tried"]} == {"triton", "reference"}
    row = table_row(out, key)
    assert "tuned" in row and entry["backend"] in row and f"{entry['ms']:.3f}" in row
    assert f"cache file: {path} (1 entry written)" in out
    assert re.search(r"^wall time: \d+\.\d s$", out, re.M)
    # A second run finds the bucket fresh and times nothing.
    assert autotune(*flags) == 0
    assert "cached" in table_row(capsys.readouterr().out, key)


def test_group_flag_names_gqa_buckets(capsys, tmp_path):
    from fa2dispatch import cli

    code = cli.main(["autotune", "--dry-run", "--simulate", "h100", "--dtype", "fp16", "--head-dim", "128",
                     "--causal", "true", "--seqlen", "1024", "--mode", "bwd", "--group", "4",
                     "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "bwd/float16/d128/causal/g4/q1024/k1024" in out and "total: 1 bucket," in out
