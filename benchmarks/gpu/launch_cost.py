"""Host-side (Python) cost of one layer's fused launches, without a GPU: what a step outside CUDA graphs pays per
layer before the GPU sees the work (mixed prefill steps run PIECEWISE graphs, attention and cache write eager).

Two parts, per launch of a decode-shaped step with the 16-bit window (the speed preset, Llama-3.2-3B attention
shape, 4 requests): our wrappers (``fused_attention``, ``write_fused``) with the Triton launches replaced by a stub,
and Triton's own launch preamble for the same arguments: the argument binder and cache key that ``JITFunction.run``
computes on every call (built for an sm_90 target, so no GPU or compile is needed).  The C launcher and
``cuLaunchKernelEx`` after them are not in these figures.  Runs on any machine with the Triton version to measure
(the GPU machine has 3.6; ``PYTHONPATH=DIR`` with ``pip install --target DIR triton==3.6.0 --no-deps`` elsewhere):

    python3 benchmarks/gpu/launch_cost.py OUT_DIR [--reps 2000]
"""

import argparse
import os
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature

import decode_attention as da

SETUP = "aquakv speed preset u1n4 + sinks/window (16-bit 4 + 128)"


class CapturedLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` keeps the arguments of the latest call."""

    def __init__(self, kernel):
        self.kernel, self.call = kernel, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.call = args, kwargs
        return launch


def per_call_us(fn, reps: int) -> float:
    """Mean time of ``reps`` calls after 50 warm-up calls, in us."""
    for _ in range(50):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1e6 * (time.perf_counter() - t) / reps


def main():
    from vllm_aquakv.kernels import attention, cache_write
    from vllm_aquakv.results import write_results
    from vllm_aquakv.window import WindowStep

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default="/tmp/out")
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    torch.manual_seed(0)
    path, fused = da.fused_setup(da.MODES[SETUP], device="cpu")
    n, ctx, (sinks, window) = 4, 256, fused.window
    kernels = ((attention, "_fused_attention_kernel"), (attention, "_combine_kernel"),
               (cache_write, "_cache_write_kernel"))
    stubs = {name: CapturedLaunch(getattr(module, name)) for module, name in kernels}
    for module, name in kernels:
        setattr(module, name, stubs[name])
    try:
        blocks = ctx // da.PAGE * n
        kv_cache = torch.zeros(blocks, da.H, da.PAGE, path.layouts[1].slot_bytes, dtype=torch.uint8)
        block_table = torch.arange(blocks, dtype=torch.int32).view(n, -1)  # [n, ctx / PAGE]
        seq_lens = torch.full((n,), ctx, dtype=torch.int32)
        qsl = list(range(n + 1))
        query = torch.randn(n, da.HQ, da.D, dtype=torch.bfloat16)
        key = torch.randn(n, da.H, da.D, dtype=torch.bfloat16)
        ring = torch.zeros(n + 1, sinks + window, da.H, da.D, dtype=torch.bfloat16)
        tags = torch.full((n + 1, sinks + window), -1, dtype=torch.int64)
        win = attention.WindowInputs(ring, ring, tags, key, key, sinks, window)
        plan = attention.plan_attention(qsl, ctx, da.HQ, da.H, "cpu", window=True)
        slots = torch.arange(n) * ctx
        step = WindowStep(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.arange(n))
        qsl_dev = torch.tensor(qsl, dtype=torch.int32)
        wrappers = {
            "fused_attention": lambda: attention.fused_attention(query, kv_cache, block_table, seq_lens, qsl_dev,
                                                                 plan, fused, 0.1, window=win),
            "write_fused": lambda: cache_write.write_fused(fused, kv_cache, slots, key, key, ring=(ring, ring, step)),
        }
        rows = [{"part": f"{name} (launches stubbed)", "us": per_call_us(fn, args.reps)}
                for name, fn in wrappers.items()]
    finally:
        for module, name in kernels:
            setattr(module, name, stubs[name].kernel)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for name, stub in stubs.items():
        call_args, kwargs = stub.call
        kwargs = {**kwargs, "debug": False, "instrumentation_mode": ""}  # as JITFunction.run adds them
        binder = create_function_from_signature(stub.kernel.signature, stub.kernel.params, backend)
        keys = {}

        def preamble(binder=binder, call_args=call_args, kwargs=kwargs, keys=keys):
            _, specialization, options = binder(*call_args, **kwargs)
            compute_cache_key(keys, specialization, options)

        rows.append({"part": f"{name}: Triton binder + cache key", "params": len(stub.kernel.arg_names),
                     "us": per_call_us(preamble, args.reps)})
    md = [f"Host-side cost per call, one layer of a 4-request decode step with the 16-bit window ({SETUP}; Triton "
          f"{triton.__version__}, sm_90 target, CPU tensors: the interpreter's dtype choices), mean of {args.reps} "
          "calls:\n", "| part | parameters | us |", "| --- | --- | --- |"]
    md += [f"| {r['part']} | {r.get('params', '-')} | {r['us']:.1f} |" for r in rows]
    print("\n".join(md))
    write_results(os.path.join(args.out_dir, "launch_cost.json"), "launch_cost", "Llama-3.2-3B attention shape",
                  rows, "\n".join(md))


if __name__ == "__main__":
    main()
