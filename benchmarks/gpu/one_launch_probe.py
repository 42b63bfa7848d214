"""Time the CUDA decode loop's one and three launches at 64 requests x 32k (Llama-3.2-3B attention shape, random
codes, CUDA events over 20 eager calls) without and with the 16-bit window; with SMID=1 also how many of the launch's
blocks ran on each SM (a build that records %smid in the counter buffer: benchmarks/gpu/one_launch_probe.sh); with TIMES=1
each block's start / codes end / end (%globaltimer).  PROBE_JSONL: also one JSON row per timing appended to that file
(VARIANT names the build)."""
import collections, json, os, sys
import torch
R = os.environ["R"]
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.abspath(R)]
sys.path.insert(0, R + "/benchmarks/gpu")
import decode_attention as da  # noqa: E402
from vllm_aquakv.kernels import cuda_decode  # noqa: E402
from vllm_aquakv.kernels.attention import fused_attention, plan_attention  # noqa: E402

for label in ["aquakv speed preset u1n4 (K mean, 2.25 b)", "aquakv speed preset u1n4 + sinks/window (16-bit 4 + 128)"]:
    path, fused = da.fused_setup(da.MODES[label])
    bt, sl, qsl_list, qsl, q = da.decode_batch(64, 32768)
    kv = da.random_slots(64 * 32768 // 16, path.layouts[1])
    win = da.window_inputs(fused, bt, 32768, q)
    out = torch.empty_like(q)
    for one in (False, True):
        plan = plan_attention(qsl_list, 32768, 24, 8, "cuda", window=win is not None)
        plan.cuda_fused = one
        f = lambda: fused_attention(q, kv, bt, sl, qsl, plan, fused, 128 ** -0.5, out=out, window=win)  # noqa
        f(); torch.cuda.synchronize()
        info = ""
        row = dict(batch=64, context=32768, kv_cache_dtype=label, variant=os.environ.get("VARIANT", ""), one_launch=one)
        if os.environ.get("SMID"):
            c = cuda_decode.counters(q.device)
            c[32768:].fill_(-1)
            f(); torch.cuda.synchronize()
            sm = c[32768:32768 + 2048].cpu()
            n = int((sm >= 0).sum())
            smz = sm[:n]
            hist = collections.Counter(smz.tolist())
            per = sorted(collections.Counter(hist.values()).items())
            first = collections.Counter(collections.Counter(smz[:512].tolist()).values())
            info = f"blocks {n} SMs {len(hist)} (SMs with k blocks: {per}; first 512 blocks: {sorted(first.items())})"
            row["blocks_per_sm"] = {"blocks": n, **{f"sms_with_{k}": v for k, v in per}}
        if os.environ.get("TIMES"):  # per block: codes time, tail (merge) time, end relative to the launch's start
            c = cuda_decode.counters(q.device)
            c[40000:].fill_(-1)
            f(); torch.cuda.synchronize()
            ts = c[40000:40000 + 3 * ((c.numel() - 40000) // 3)].view(-1, 3).long().cpu()
            ts = ts[ts[:, 0] >= 0]  # the launch's blocks (codes segments, and ring blocks where it has them)
            end = torch.where(ts[:, 2] >= 0, ts[:, 2], ts[:, 1])
            t0 = ts[:, 0].min()
            at = torch.tensor([0.0, 0.5, 0.9, 1.0], dtype=torch.float64)
            info = "us [min, median, p90, max]:"
            for key, x in (("start", ts[:, 0] - t0), ("codes", ts[:, 1] - ts[:, 0]), ("tail", end - ts[:, 1]),
                           ("end", end - t0)):
                us = [round(float(v) / 1000, 1) for v in torch.quantile(x.double(), at)]
                row[f"block_{key}_us"] = dict(zip(("min", "median", "p90", "max"), us))
                info += f" {key} {us}"
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            f()
        e.record(); torch.cuda.synchronize()
        row["time_us"] = round(s.elapsed_time(e) / 20 * 1000, 1)
        print(f"{label[20:60]:40s} one_launch={one} {row['time_us']:.1f} us {info}", flush=True)
        if os.environ.get("PROBE_JSONL"):
            with open(os.environ["PROBE_JSONL"], "a") as rows:
                rows.write(json.dumps(row) + "\n")
