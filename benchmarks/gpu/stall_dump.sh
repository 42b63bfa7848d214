#!/usr/bin/env bash
# Where a stalled GPU run waits: watches DIR (a stage's output folder), and once no file under it has changed for
# IDLE seconds, appends to OUT_FILE the GPU's utilization (busy: a kernel that does not end; idle: the host waits) and,
# for every python (and VLLM::*) process, its threads' kernel wait channels and a py-spy stack dump with native frames
# (PY_SPY: a py-spy binary, e.g. carried in .gpu-tools/; without it the wait channels only).  At most DUMPS dumps,
# IDLE apart.
#   usage: stall_dump.sh OUT_FILE DIR [IDLE=40] [DUMPS=4]     (device_call.sh runs it beside a stage when WATCH=1)
set -u
out=$1 dir=$2 idle=${3:-40} dumps=${4:-4}
done_dumps=0 last=0
while [ $done_dumps -lt $dumps ]; do
  sleep 5
  newest=$(find "$dir" -type f -printf '%T@\n' 2>/dev/null | sort -n | tail -1)
  [ -z "$newest" ] && continue
  now=$(date +%s)
  age=$(( now - ${newest%.*} ))
  [ $age -lt $idle ] || [ $(( now - last )) -lt $idle ] && continue
  last=$now done_dumps=$((done_dumps + 1))
  {
    echo "##### dump $done_dumps at $(date +%T): nothing under $dir changed for ${age}s"
    nvidia-smi --query-gpu=utilization.gpu,memory.used,power.draw --format=csv
    for p in $(pgrep -f "python|VLLM"); do  # (vLLM renames its engine process VLLM::EngineCore)
      echo "=== pid $p: $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-160)"
      for t in /proc/$p/task/*; do echo "$(basename $t) $(cat $t/comm) $(cat $t/wchan 2>/dev/null)"; done | sort -k3 | uniq -c -f2 | head -20
      [ -n "${PY_SPY:-}" ] && timeout 30 "$PY_SPY" dump --native --pid $p 2>&1 | head -200
    done
  } >> "$out" 2>&1
done
