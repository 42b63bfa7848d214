#!/usr/bin/env bash
# One device call (carry [".gpu-bundle"]): installs the vLLM bundle, stages the plugin, then runs the stages named
# in STAGE (default "tests decode"), each with its own timeout; every stage reads its options from the environment:
#   tests   pytest tests/test_kernels.py [-k "$TESTK"]            decode / decode2  benchmarks/gpu/decode_attention.py
#   tp      benchmarks/gpu/throughput.py --formats "$FORMATS" (GMU) smoke   benchmarks/gpu/plugin_smoke.py $SM_ARGS
#   serve   benchmarks/gpu/serve.py --formats "$FORMATS" $SV_ARGS tps     benchmarks/torch_path_step.py $TPS_ARGS
#   cw      benchmarks/gpu/cache_write.py $CW_ARGS         prefill  decode_attention.py --prefill-only $PF_ARGS
#   parity  benchmarks/greedy_parity.py $PAR_MODEL --out $OUT/parity.json $PAR_ARGS (the carried .xfer is /tmp/xfer)
# (the logs go into $OUT/logs.tar.gz where $OUT would hold more than the 8 files the device tool brings back)
# WATCH=1: stall_dump.sh beside each stage ($OUT/stall_<stage>.txt once $OUT is idle for WATCH_IDLE s, default 40;
# py-spy from .gpu-tools/py-spy when carried)
# e.g. STAGE="tests tps" TESTK="torch_path_through_flash or fused_begin" bash benchmarks/gpu/device_call.sh
# GPU_BUNDLE: the carried bundle folder (default .gpu-bundle); a two-part WITH_FA2=1 bundle (turboquant) comes as two
# folders, one part each, over two calls on the warm machine: the first call's install.sh exits 3 (README)
set -u
B=${GPU_BUNDLE:-.gpu-bundle}
GPU_VLLM_CHECK=${GPU_VLLM_CHECK:-quick} bash $B/install.sh $B || exit $?
export PYTHONPATH=/tmp/vllm-site:/tmp/aquakv-site PATH=/tmp/vllm-site/bin:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  VLLM_NO_USAGE_STATS=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 GPU_VLLM_CHECK=quick
bash benchmarks/gpu/stage_plugin.sh
R=$(pwd)
cd /tmp  # not the checkout: its vllm_aquakv/ (without kernels/) would shadow the staged plugin for `python -m` helpers
for s in ${STAGE:-tests decode}; do
  echo "=== stage $s $(date +%T)"
  watcher=
  if [ -n "${WATCH:-}" ]; then
    PY_SPY=$([ -x $R/.gpu-tools/py-spy ] && echo $R/.gpu-tools/py-spy) bash $R/benchmarks/gpu/stall_dump.sh \
      $OUT/stall_$s.txt $OUT ${WATCH_IDLE:-40} & watcher=$!
  fi
  case $s in
    tests) (timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x $R/tests/test_kernels.py ${TESTK:+-k "$TESTK"} 2>&1 | tee $OUT/tests.txt | tail -25) ;;
    decode) timeout ${DEC_TIMEOUT:-300} python3 $R/benchmarks/gpu/decode_attention.py $OUT/${DEC_DIR:-dq} --graphs --no-sweep --no-prefill \
        --only "${ONLY:-u1n4 (K mean,u1n4 + sinks}" ${DEC_ARGS:-} --batches ${BATCHES:-16,64,128} --contexts ${CONTEXTS:-8192,32768} 2>&1 | grep -v "^WARNING\|^INFO" | tail -${DEC_TAIL:-60} ;;
    decode2) timeout ${DEC2_TIMEOUT:-300} python3 $R/benchmarks/gpu/decode_attention.py $OUT/dq2 --graphs --no-sweep --no-prefill \
        --only "${ONLY2:-u1n4 (K mean,u1n4 + sinks}" ${DEC2_ARGS:-} --batches ${BATCHES2:-1,16,64} --contexts ${CONTEXTS2:-4096,16384,32768} 2>&1 | grep -v "^WARNING\|^INFO" | tail -${DEC_TAIL:-60} ;;
    tp) timeout ${TP_TIMEOUT:-560} python3 $R/benchmarks/gpu/throughput.py $OUT/tp --formats ${FORMATS} --input-len ${IN:-4096} --output-len ${OUTLEN:-1024} \
        --num-prompts ${NP:-128} --gpu-memory-utilization ${GMU:-0.2} --max-num-seqs ${NP:-128} --timeout ${TPT:-250} 2>&1 | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30 ;;
    smoke) timeout ${SM_TIMEOUT:-400} python3 $R/benchmarks/gpu/plugin_smoke.py $OUT/sm ${SM_ARGS:-} 2>&1 | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -30 ;;
    tps) timeout ${TPS_TIMEOUT:-300} python3 $R/benchmarks/torch_path_step.py $OUT/tps.json ${TPS_ARGS:---batches 1,16,64 --contexts 1024,4096} 2>&1 | grep -v "^WARNING\|^INFO" | tail -20 ;;
    serve) timeout ${SV_TIMEOUT:-400} python3 $R/benchmarks/gpu/serve.py $OUT/sv --formats ${FORMATS} ${SV_ARGS:-} 2>&1 | grep -v "^WARNING\|^INFO\|^(EngineCore\|^(APIServer" | tail -25 ;;
    prefill) timeout ${PF_TIMEOUT:-200} python3 $R/benchmarks/gpu/decode_attention.py $OUT/pf --no-sweep --prefill-only \
        --only "${ONLY_PF:-u1n4 + sinks/window (16}" ${PF_ARGS:-} 2>&1 | grep -v "^WARNING\|^INFO" | tail -${PF_TAIL:-70} ;;
    parity) ln -sfn $R/.xfer /tmp/xfer; timeout ${PAR_TIMEOUT:-300} python3 $R/benchmarks/greedy_parity.py $PAR_MODEL --out $OUT/parity.json ${PAR_ARGS:-} 2>&1 | grep -v "^WARNING\|^INFO\|^(EngineCore" | tail -40 ;;
    cw) timeout ${CW_TIMEOUT:-200} python3 $R/benchmarks/gpu/cache_write.py $OUT/cw ${CW_ARGS:---tokens 1,256,8192 --block-n 64 --warps 8} 2>&1 | grep -v "^WARNING\|^INFO" | tail -20 ;;
  esac
  [ -n "$watcher" ] && kill $watcher 2>/dev/null
done
# the device tool brings back at most 8 files from $OUT: past that, the logs (log_*, stall_*) travel as one tarball
if [ "$(find $OUT -type f | wc -l)" -gt 8 ]; then
  (cd $OUT && find . -type f \( -name 'log_*' -o -name 'stall_*' \) -print0 | tar -czf logs.tar.gz --null -T - --remove-files)
  echo "more than 8 files under \$OUT: logs packed into logs.tar.gz ($(find $OUT -type f | wc -l) files now)"
fi
echo "=== done $(date +%T)"
