#!/usr/bin/env bash
# Why the CUDA decode loop's one launch (AttentionPlan.cuda_fused) is slower than its three at 64 x 32k: one device call
# (carry [".gpu-bundle"]) builds variants of kernels/decode_codes.cu in the device's copy of the checkout and times
# each (benchmarks/gpu/one_launch_probe.py): smid (as committed, plus each block's SM id recorded: blocks per SM),
# no_tail (one launch without the last-block merge: no counter, no combine; its output is not complete),
# no_combine (the counter's atomic, no combine), no_ring (the ring's blocks return at once), times (each block's
# start / codes end / end by %globaltimer: where the time goes), dead_tail (the merge compiled, skipped at run time),
# no_wcheck (the codes loop without its sinks / window check); rows also go to $OUT/one_launch_probe.jsonl when $OUT is
# set (the device call's).  The source is restored
# at the end.  e.g. `bash benchmarks/gpu/one_launch_probe.sh`; VARIANTS="smid no_tail" to choose.
set -u
B=.gpu-bundle
GPU_VLLM_CHECK=quick bash $B/install.sh $B >/dev/null || exit $?
export PYTHONPATH=/tmp/vllm-site:/tmp/aquakv-site PATH=/tmp/vllm-site/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
R=$(pwd)
cp kernels/decode_codes.cu /tmp/orig.cu
cp kernels/cuda_decode.py /tmp/orig.py
for v in ${VARIANTS:-smid no_tail no_combine no_ring}; do
  cp /tmp/orig.cu kernels/decode_codes.cu
  cp /tmp/orig.py kernels/cuda_decode.py
  V=$v python3 - <<'PY'
import os
v = os.environ["V"]
p = 'kernels/decode_codes.cu'; s = open(p).read()
def sub(a, b):
    global s
    assert a in s, a
    s = s.replace(a, b)
if v in ("smid", "times", "dead_tail"):  # these record into the counter buffer, so three launches get it too
    q = 'kernels/cuda_decode.py'; t = open(q).read(); a = "counters(query.device) if fused else seq_lens"; assert a in t
    open(q, 'w').write(t.replace(a, "counters(query.device)"))
if v == "smid":
    a = "    const int seq = blockIdx.x, kv_head = blockIdx.y, segment = blockIdx.z;\n"
    sub(a, a + "    if (threadIdx.x == 0) { unsigned sm; asm volatile(\"mov.u32 %0, %%smid;\" : \"=r\"(sm)); counters[32768 + blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)] = (int)sm; }\n")
elif v in ("times", "dead_tail"):  # times: %globaltimer at each block's start, codes end and end (counters[40000:])
    if v == "dead_tail":  # the tail compiled but skipped at run time: does its code alone slow the codes loop?
        sub("#if FUSED\n    // --- the last block", "#if FUSED\n    if (num_tokens < 0) {\n    // --- the last block")
        sub("q_rows, &acc_merge[0][0][0]);\n#endif\n}", "q_rows, &acc_merge[0][0][0]);\n    }\n#endif\n}")
    stamp = ("    if (threadIdx.x == 0) { unsigned long long ns; asm volatile(\"mov.u64 %0, %%globaltimer;\" : \"=l\"(ns)); "
             "counters[40000 + 3 * (blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)) + K] = (int)(ns & 0x7fffffff); }\n")
    a = "    const int seq = blockIdx.x, kv_head = blockIdx.y, segment = blockIdx.z;\n"
    sub(a, a + stamp.replace("K]", "0]"))
    a = "    }  // (the codes segment)\n"
    sub(a, a + stamp.replace("K]", "1]"))
    a = "q_rows, &acc_merge[0][0][0]);\n"
    sub(a, a + stamp.replace("K]", "2]"))
elif v == "no_wcheck":  # the codes loop without its sinks / window check (wrong output: what does the check cost?)
    sub("#if HAS_WINDOW\n    // sinks and recent keys whose", "#if 0\n    // sinks and recent keys whose")
elif v == "no_combine":
    sub("        if (!last) return;\n    }\n    combine_parts(", "        if (!last) return;\n    }\n    return;\n    combine_parts(")
elif v == "no_tail":
    sub("#if FUSED\n    // --- the last block", "#if 0\n    // --- the last block")
elif v == "no_ring":
    sub("        float m[G], l[G], ax[G];\n        ring_partial(", "        float m[G], l[G], ax[G];\n        if (context >= 0) return;\n        ring_partial(")
open(p, 'w').write(s)
PY
  bash benchmarks/gpu/stage_plugin.sh >/dev/null
  echo "=== $v"
  (cd /tmp && SMID=$([ $v = smid ] && echo 1) TIMES=$([ $v = times ] && echo 1) VARIANT=$v PROBE_JSONL=${OUT:+$OUT/one_launch_probe.jsonl} R=$R timeout 100 python3 $R/benchmarks/gpu/one_launch_probe.py 2>&1 | grep -v "^WARNING\|^INFO" | tail -6)
done
cp /tmp/orig.cu kernels/decode_codes.cu; cp /tmp/orig.py kernels/cuda_decode.py
