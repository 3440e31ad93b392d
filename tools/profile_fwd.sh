#!/usr/bin/env bash
# Nsight Compute profiles of one forward launch per (provider, seqlen) (tools/profile_fwd.py):
# the CuPy forward against FlashAttention-2 (PyTorch SDPA's flash backend) at the cells issue 5
# measures, D=128 fp16 non-causal. Text reports land in $OUT/ncu_<provider>_<seqlen>.txt.
#
#   OUT=/tmp/out PROVIDERS="cupy flash" SEQLENS="2048 16384" bash tools/profile_fwd.sh
#   OUT=/tmp/out PROVIDERS="triton cudnn" SEQLENS="4096 16384" DECODE=0 bash tools/profile_fwd.sh
#
# KERNEL_REGEX picks the profiled kernels (one per call; --launch-skip skips the warm-up calls'):
# the default covers the CuPy forward (fa2_fwd*), FlashAttention-2 (flash_fwd*), our Triton and
# Gluon forwards (attn_fwd*) and cuDNN's SDPA kernels (names with sdpa or fprop).
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
NCU="${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)}"
if [ -z "$NCU" ]; then
    echo "profile_fwd: ncu not found"
    exit 2
fi
sections=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
          --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats
          --section MemoryWorkloadAnalysis)
metrics="sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum,gpu__time_duration.sum"
for provider in ${PROVIDERS:-cupy flash}; do
    for s in ${SEQLENS:-2048 16384}; do
        echo "== ncu $provider S=$s ${EXTRA:-}"
        timeout 240 "$NCU" --clock-control none -k "regex:${KERNEL_REGEX:-fa2_fwd|flash_fwd|attn_fwd|sdpa|fprop}" \
            --launch-skip 3 --launch-count 1 \
            "${sections[@]}" --metrics "$metrics" \
            python3 tools/profile_fwd.py --provider "$provider" --seqlen "$s" ${EXTRA:-} \
            > "$OUT/ncu_${provider}_${s}.txt" 2>&1
        echo "   exit $?"
        grep -E "Duration|Issue Slots Busy|hmma|pipe_xu|issue_active|Registers Per|Achieved Occupancy|Block Limit Registers|Waves Per SM|Stall" \
            "$OUT/ncu_${provider}_${s}.txt" | head -30
    done
done

if [ "${DECODE:-1}" = 1 ]; then
    # Decode at B=1 (GQA 8:1, 32k keys, D=128 fp16): each kernel of the call on its own
    # (kv_check is off, as in a decode loop), with ncu's cold caches between passes.
    echo "== ncu decode B=1"
    timeout 240 "$NCU" --clock-control none -k 'regex:decode' --launch-skip 4 --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
        --metrics "gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed" \
        python3 -c "
import sys, torch
sys.path.insert(0, 'tools')
import bench_decode as b
import fa2dispatch.kvcache as kvc
kvc.CHECK_VALUES = False
q, kc, vc, lens = b.make_decode(1, torch.float16)
for _ in range(3):
    kvc.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
torch.cuda.synchronize()
" > "$OUT/ncu_decode_b1.txt" 2>&1
    echo "   exit $?"
    grep -E "decode|Duration|DRAM Throughput|dram__|Memory Throughput|Registers Per|Waves" "$OUT/ncu_decode_b1.txt" | head -30
fi
