#!/usr/bin/env bash
# Re-tune the shipped H100 cache (autotune_cache/) after a kernel-source change: every bucket the
# shipped file holds, in the order below, each command resuming from what the cache already has
# (a bucket tuned on the current sources is skipped). Stops cleanly before DEADLINE seconds
# (default 560) so that one device call can hand the cache back; run it again in the next call
# with the returned file in autotune_cache/ until it prints "retune: complete".
#
#   OUT=/tmp/out DEADLINE=560 bash tools/retune_shipped.sh
#
# The file lands in $OUT/ (the device tool returns it); tests/test_shipped_cache.py checks that
# it covers every bucket on the current sources. A bucket stale only because some backends'
# kernel sources changed is re-tuned in part (fa2dispatch/autotune/tuner.py): those backends'
# candidates, and the others' stored picks timed again. WHOLE=1 passes --whole (everything).
# JOBS=N passes --jobs N: each bucket's candidates compiled ahead in N worker processes.
set -uo pipefail

# One compiled-kernel cache for the tuner, its --jobs workers and every command below: without
# platformdirs (the device image) the CuPy backend would compile into a new temporary directory
# per process.
export FA2DISPATCH_CACHE_DIR="${FA2DISPATCH_CACHE_DIR:-$(mktemp -d)}"
OUT="${OUT:-/tmp/out}"
DEADLINE="${DEADLINE:-560}"
mkdir -p "$OUT"
start=$SECONDS
commands=(
    ""                                                              # the default grid (48 buckets)
    "--head-dim 128 --seqlen 2048,8192 --mode fwd"
    "--head-dim 128 --seqlen 1x4096,1x16384 --causal true --mode fwd"
    "--head-dim 128 --group 4 --causal true --seqlen 1024,4096,16384"
    "--head-dim 128 --group 4 --causal true --seqlen 1x4096,1x16384 --mode fwd"
)
rc=0
for args in "${commands[@]}"; do
    left=$(( DEADLINE - (SECONDS - start) ))
    if [ "$left" -le 20 ]; then
        echo "retune: out of time before: fa2dispatch autotune $args"
        rc=124
        break
    fi
    read -r -a argv <<< "$args"
    echo "== fa2dispatch autotune ${args:-(default grid)} (${left}s left)"
    [ "${WHOLE:-0}" = 1 ] && argv+=(--whole)
    [ "${JOBS:-0}" != 0 ] && argv+=(--jobs "$JOBS")
    COLUMNS=160 timeout "$left" fa2dispatch autotune ${argv[@]+"${argv[@]}"} --cache-dir autotune_cache \
        >> "$OUT/retune.log" 2>&1
    rc=$?
    echo "   exit $rc after $(( SECONDS - start )) s"
    [ "$rc" -eq 0 ] || break
done
cp autotune_cache/*.json "$OUT/"
if [ "$rc" -eq 0 ]; then
    echo "retune: complete"
fi
exit "$rc"
