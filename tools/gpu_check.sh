#!/usr/bin/env bash
# One-call GPU check for a remote machine (torch, triton, pytest, rich preinstalled; no network;
# the repository as working directory): environment report, GPU tests, then the benchmark.
#
#   OUT=/tmp/out BENCH_ARGS="--quick --modes fwd" bash tools/gpu_check.sh
#   SKIP_TESTS=1 BENCH_ARGS="--dtype bf16" bash tools/gpu_check.sh    # benchmark only
#   SKIP_BENCH=1 bash tools/gpu_check.sh                               # tests, report, overhead
#   AUTOTUNE_ARGS="--dtype fp16" bash tools/gpu_check.sh               # tune into autotune_cache/ only
#   TESTS="tests/test_cupy_gpu.py" bash tools/gpu_check.sh             # a subset of the gpu tests
#   CUPY_BENCH_ARGS="--head-dims 128 --seqlens 2048,16384" ...          # also bench the CuPy backend
#   FP8_BENCH_ARGS="--quick" ...                                        # also run tools/bench_fp8.py
#   SKIP_OVERHEAD=1 ...                                                 # no dispatch-overhead run
#   PYTEST_ARGS="-n 4" ...                                              # extra pytest arguments
#   DECODE_BENCH_ARGS="--varlen" ...                                    # also run tools/bench_decode.py
#   FUZZ_ARGS="--n 1000" ...                                            # also run tools/fuzz.py
#   HOPPER_SWEEP_ARGS="--head-dims 128" ...                             # also run tools/sweep_hopper.py
#   CUPY_SWEEP_ARGS="--seqlens 2048 --variants 'a:;b:fwd_stages=4'" ... # also run tools/sweep_cupy.py
#   GLUON_SWEEP_ARGS="--head-dims 128 --configs 64:64:2:1:4:0" ...     # also run tools/sweep_gluon.py
#   VARLEN_BENCH_ARGS="--dtypes float16 --unequal" ...                 # also run tools/bench_varlen.py
#   GLUON_BWD_SWEEP_ARGS="--head-dims 128 --seqlens 4096" ...           # also run tools/sweep_gluon_bwd.py
#   PROFILE_BWD_ARGS="--seqlen 4096 --causal" ...                       # also run tools/profile_bwd.py
#   PROFILE_HOST_ARGS="--causal --breakdown" ...                        # also run tools/profile_host.py
#   RETUNE_DEADLINE=300 ...                                             # last: tools/retune_shipped.sh
#   RETUNE_BY=560 ...                                                   # the same, stopping by second 560
#   JOBS=8 RETUNE_BY=560 ...                                            # the re-tune compiling ahead (--jobs)
#                                                                       # (either: only if the tests passed)
#
# Everything worth keeping lands in $OUT/results.tar.gz (the device tool returns at most 8
# files): gpu_tests.log, report.txt, report.json, overhead.*, bench*.log/json/md, autotune files.
# Exits with the test exit code; a failing benchmark is reported but does not change it.
set -euo pipefail

FINAL_OUT="${OUT:-/tmp/out}"
OUT="$FINAL_OUT/all"
BENCH_ARGS="${BENCH_ARGS:-}"
mkdir -p "$OUT"
pack() { tar -C "$FINAL_OUT" -czf "$FINAL_OUT/results.tar.gz" all && rm -rf "$OUT"; }
trap pack EXIT

echo "== GPU"
# Current vs max SM clock: a throttled or power-capped GPU explains low numbers before any kernel does.
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || echo "nvidia-smi failed"

echo "== versions"
python3 --version
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || echo "torch import failed"
python3 -c "import triton; print('triton', triton.__version__)" || echo "triton import failed"

echo "== install"
# No network: no build isolation, no dependency resolution; everything needed is already there.
# backends/ maps into the package (pyproject.toml), so PYTHONPATH alone would not do.
if ! python3 -m pip install --no-deps --no-build-isolation -q -e .; then
    echo "editable install failed; trying a plain install"
    python3 -m pip install --no-deps --no-build-isolation -q . || { echo "install failed"; exit 4; }
fi

if [ -n "${AUTOTUNE_ARGS:-}" ]; then
    # Tune into the repository's autotune_cache/ (shipped), resuming from what is already there,
    # and hand the result back through $OUT.
    echo "== autotune ${AUTOTUNE_ARGS}"
    read -r -a tune_args <<< "$AUTOTUNE_ARGS"
    set +e
    start=$(date +%s)
    COLUMNS=160 fa2dispatch autotune "${tune_args[@]}" --cache-dir autotune_cache 2>&1 | tee "$OUT/autotune.log"
    tune_rc=${PIPESTATUS[0]}
    echo "autotune exit $tune_rc after $(( $(date +%s) - start )) s"
    set -e
    mkdir -p "$OUT/autotune_cache"
    cp autotune_cache/*.json "$OUT/autotune_cache/" 2>/dev/null || echo "no cache file written"
    exit "$tune_rc"
fi

echo "== GPU tests"
# --timeout needs pytest-timeout; without the plugin pytest would stop at a usage error.
timeout_args=()
if python3 -c "import pytest_timeout" 2>/dev/null; then
    timeout_args=(--timeout=300)
else
    echo "pytest-timeout not installed: running without --timeout"
fi
set +e
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    echo "SKIP_TESTS=1: benchmark only" | tee "$OUT/gpu_tests.log"
    test_rc=0
else
    read -r -a test_paths <<< "${TESTS:-tests}"
    read -r -a extra_pytest <<< "${PYTEST_ARGS:-}"   # e.g. "-n 4": NVRTC and Triton compiles run in parallel
    python3 -m pytest -m gpu -q -p no:cacheprovider ${timeout_args[@]+"${timeout_args[@]}"} \
        ${extra_pytest[@]+"${extra_pytest[@]}"} "${test_paths[@]}" 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -v -E '^(PASSED|SKIPPED) '
    test_rc=${PIPESTATUS[0]}
fi
set -e

echo "== selection report"
set +e
COLUMNS=160 fa2dispatch report > "$OUT/report.txt" 2>&1; echo "report exit $?"
head -n 60 "$OUT/report.txt"
fa2dispatch report --json > "$OUT/report.json" 2> "$OUT/report_json.err"; echo "report --json exit $?"

if [ "${SKIP_OVERHEAD:-0}" != 1 ]; then
    echo "== dispatch overhead"
    PYTHONUNBUFFERED=1 python3 tools/bench.py --overhead --json "$OUT/overhead.json" --markdown "$OUT/overhead.md" \
        2>&1 | tee "$OUT/overhead.log"
fi
set -e

echo "== benchmark"
bench_rc=0
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    echo "SKIP_BENCH=1: no benchmark"
else
    # Split BENCH_ARGS on whitespace without letting the shell glob it.
    read -r -a bench_args <<< "$BENCH_ARGS"
    set +e
    PYTHONUNBUFFERED=1 python3 tools/bench.py --json "$OUT/bench.json" --markdown "$OUT/bench.md" \
        ${bench_args[@]+"${bench_args[@]}"} 2>&1 | tee "$OUT/bench.log"
    bench_rc=${PIPESTATUS[0]}
    set -e
fi
set +e
if [ -n "${CUPY_BENCH_ARGS:-}" ]; then
    echo "== benchmark: the CuPy backend"
    read -r -a cupy_args <<< "$CUPY_BENCH_ARGS"
    PYTHONUNBUFFERED=1 python3 tools/bench.py --backend cupy --json "$OUT/bench_cupy.json" \
        --markdown "$OUT/bench_cupy.md" "${cupy_args[@]}" 2>&1 | tee "$OUT/bench_cupy.log"
    echo "cupy bench exit ${PIPESTATUS[0]}"
fi
if [ -n "${FP8_BENCH_ARGS:-}" ]; then
    echo "== benchmark: fp8"
    read -r -a fp8_args <<< "$FP8_BENCH_ARGS"
    PYTHONUNBUFFERED=1 python3 tools/bench_fp8.py --out "$OUT/bench_fp8" "${fp8_args[@]}" 2>&1 | tee "$OUT/bench_fp8.log"
    echo "fp8 bench exit ${PIPESTATUS[0]}"
fi
if [ -n "${DECODE_BENCH_ARGS:-}" ]; then
    echo "== benchmark: KV-cache decode and varlen"
    read -r -a decode_args <<< "$DECODE_BENCH_ARGS"
    PYTHONUNBUFFERED=1 python3 tools/bench_decode.py --out "$OUT/bench_decode.json" "${decode_args[@]}" 2>&1 \
        | tee "$OUT/bench_decode.log"
    echo "decode bench exit ${PIPESTATUS[0]}"
fi
if [ -n "${FUZZ_ARGS:-}" ]; then
    echo "== numerics fuzz"
    read -r -a fuzz_args <<< "$FUZZ_ARGS"
    PYTHONUNBUFFERED=1 python3 tools/fuzz.py "${fuzz_args[@]}" 2>&1 | tail -n 80 | tee "$OUT/fuzz.log"
    echo "fuzz exit ${PIPESTATUS[0]}"
fi
if [ -n "${HOPPER_SWEEP_ARGS:-}" ]; then
    echo "== Hopper forward sweep"
    read -r -a sweep_args <<< "$HOPPER_SWEEP_ARGS"
    PYTHONUNBUFFERED=1 python3 tools/sweep_hopper.py "${sweep_args[@]}" 2>&1 | tee "$OUT/sweep_hopper.log"
    echo "hopper sweep exit ${PIPESTATUS[0]}"
fi
if [ -n "${CUPY_SWEEP_ARGS:-}" ]; then
    echo "== CuPy forward sweep"
    eval "cupy_sweep_args=(${CUPY_SWEEP_ARGS})"   # variants carry ';' and quotes
    PYTHONUNBUFFERED=1 timeout 300 python3 tools/sweep_cupy.py --json "$OUT/sweep_cupy.json" "${cupy_sweep_args[@]}" 2>&1 \
        | tee "$OUT/sweep_cupy.log"
    echo "cupy sweep exit ${PIPESTATUS[0]}"
fi
if [ -n "${GLUON_SWEEP_ARGS:-}" ]; then
    echo "== Gluon forward sweep"
    read -r -a gluon_args <<< "$GLUON_SWEEP_ARGS"
    # The warp-specialized configs have hung before (docs/HOPPER_ATTEMPTS.md): always under a timeout.
    PYTHONUNBUFFERED=1 timeout "${GLUON_SWEEP_TIMEOUT:-240}" python3 tools/sweep_gluon.py --json "$OUT/sweep_gluon.json" \
        "${gluon_args[@]}" 2>&1 | tee "$OUT/sweep_gluon.log"
    echo "gluon sweep exit ${PIPESTATUS[0]}"
fi
if [ -n "${GLUON_BWD_SWEEP_ARGS:-}" ]; then
    echo "== Gluon dK/dV sweep"
    read -r -a gluon_bwd_args <<< "$GLUON_BWD_SWEEP_ARGS"
    # never run on a GPU before session 13: under a timeout, as the Gluon forwards were
    PYTHONUNBUFFERED=1 timeout "${GLUON_SWEEP_TIMEOUT:-240}" python3 tools/sweep_gluon_bwd.py "${gluon_bwd_args[@]}" 2>&1 \
        | tee "$OUT/sweep_gluon_bwd.log"
    echo "gluon bwd sweep exit ${PIPESTATUS[0]}"
fi
if [ -n "${PROFILE_BWD_ARGS:-}" ]; then
    echo "== backward, kernel by kernel"
    read -r -a profile_bwd_args <<< "$PROFILE_BWD_ARGS"
    PYTHONUNBUFFERED=1 timeout 200 python3 tools/profile_bwd.py --json "$OUT/profile_bwd.json" \
        "${profile_bwd_args[@]}" 2>&1 | tee "$OUT/profile_bwd.log"
    echo "profile_bwd exit ${PIPESTATUS[0]}"
fi
if [ -n "${PROFILE_HOST_ARGS:-}" ]; then
    echo "== host time per call, by layer"
    read -r -a profile_host_args <<< "$PROFILE_HOST_ARGS"
    PYTHONUNBUFFERED=1 timeout 200 python3 tools/profile_host.py "${profile_host_args[@]}" 2>&1 \
        | tee "$OUT/profile_host.log"
    echo "profile_host exit ${PIPESTATUS[0]}"
fi
if [ -n "${VARLEN_BENCH_ARGS:-}" ]; then
    echo "== benchmark: varlen against dense"
    read -r -a varlen_args <<< "$VARLEN_BENCH_ARGS"
    PYTHONUNBUFFERED=1 timeout 200 python3 tools/bench_varlen.py --out "$OUT/bench_varlen.json" "${varlen_args[@]}" 2>&1 \
        | tee "$OUT/bench_varlen.log"
    echo "varlen bench exit ${PIPESTATUS[0]}"
fi
if [ -n "${RETUNE_BY:-}" ]; then
    # RETUNE_BY: the second (counted from this script's start) by which the re-tune must have
    # stopped, so that it takes whatever the steps above left of the call
    RETUNE_DEADLINE=$(( RETUNE_BY - SECONDS ))
fi
if [ -n "${RETUNE_DEADLINE:-}" ] && [ "$test_rc" -ne 0 ]; then
    echo "== no re-tune: the tests failed (exit $test_rc)"
elif [ -n "${RETUNE_DEADLINE:-}" ]; then
    echo "== re-tune the shipped cache (${RETUNE_DEADLINE} s)"
    OUT="$OUT" DEADLINE="$RETUNE_DEADLINE" bash tools/retune_shipped.sh
    echo "retune exit $?"
    tail -n 5 "$OUT/retune.log"
    grep -hE "^(compiled ahead|wall time)|^== " "$OUT/retune.log" || true  # JOBS=N: the compile-ahead pass
fi
set -e

echo "== summary"
# pytest -q ends with one line like "12 passed, 3 skipped in 4.56s"; exit code 5 means no test was collected.
summary=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/gpu_tests.log" | tail -n 1 || true)
echo "tests: ${summary:-<no summary line>} (exit $test_rc)"
echo "bench: exit $bench_rc"
exit "$test_rc"
