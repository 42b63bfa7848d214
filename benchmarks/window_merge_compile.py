"""Offline sm_90a build of ``kernels/reconstruct.py``'s ``_window_merge_kernel`` for each launch (queries per program,
keys per step, warps): registers, spills and shared memory per program from ptxas, on a machine without a GPU.

    python benchmarks/window_merge_compile.py [--group 3] [--launches 16x32x4,32x64x8]  (served launch first)

Pointers and strides are marked divisible by 16, as Triton specializes them at run time (the LSE's strides are not
specialized: ``do_not_specialize``); without those hints every load compiles scalar and the counts are wrong.
Needs Triton's bundled ptxas (the ``triton`` wheel has it); this Triton may be newer than the GPU machine's.
"""

import argparse
import os
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from vllm_aquakv.kernels.reconstruct import (_window_merge_kernel, window_block_for, window_merge_launch,
                                             window_merge_meta)

POINTERS = ("q_ptr", "k_ptr", "v_ptr", "oc_ptr", "lc_ptr", "out_ptr", "blocks_ptr", "cu_q_ptr", "cu_k_ptr",
            "seq_k_ptr")
STRIDES = ("stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_on", "stride_oh", "stride_ln", "stride_lh",
           "stride_outn", "stride_outh")
UNSPECIALIZED = ("stride_ln", "stride_lh")


def build(group: int, block_m: int, block_n: int, warps: int, window: int = 128, head_dim: int = 128) -> dict:
    """ptxas's resource figures for one launch of the kernel (bf16 inputs, the GQA group ``group``)."""
    types = {"lc_ptr": "*fp32", "blocks_ptr": "*i32", "cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "seq_k_ptr": "*i32"}
    signature = {n: types.get(n, "*bf16") for n in POINTERS}
    signature["qk_scale"] = "fp32"
    signature.update({n: "i32" for n in STRIDES})
    block = window_block_for(block_m)  # the window blocks the backend makes for such a launch
    constants = window_merge_meta(group, window, head_dim, (block_m, block_n, warps), tl.bfloat16, block)
    warps = constants.pop("num_warps")
    signature.update({n: "constexpr" for n in constants})
    names = list(signature)
    hinted = [n for n in POINTERS + STRIDES if n not in UNSPECIALIZED]
    source = triton.compiler.ASTSource(fn=_window_merge_kernel, signature=signature,
                                       constexprs={(names.index(n),): v for n, v in constants.items()},
                                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in hinted})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        for ptxas in ("ptxas", "ptxas-blackwell"):  # (the newer one where this Triton's PTX outgrows the other)
            run = subprocess.run([os.path.join(bin_dir, ptxas), "-arch=sm_90a", "-v", ptx, "-o",
                                  os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
            if run.returncode == 0:
                break
        else:
            raise RuntimeError(f"no ptxas in {bin_dir} builds this PTX: {run.stderr.strip()[-300:]}")
        log = run.stderr
    registers = int(log.split("Used ")[1].split(" registers")[0])
    spills = int(log.split(" bytes spill stores")[0].rsplit(" ", 1)[1])
    return {"registers": registers, "spill_store_bytes": spills, "shared_bytes": kernel.metadata.shared}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", type=int, default=3, help="query heads per KV head (Llama-3.2-3B: 3)")
    ap.add_argument("--launches", default=None, help="queries x keys x warps per program, comma-separated (default: "
                    "the served launch for the group, then 32x64x8,32x32x8,16x32x8,16x16x4,8x32x4)")
    args = ap.parse_args()
    served = "x".join(map(str, window_merge_launch(args.group)))
    launches = args.launches or ",".join(dict.fromkeys([served, "32x64x8", "32x32x8", "16x32x8", "16x16x4", "8x32x4"]))
    print(f"_window_merge_kernel, sm_90a, G={args.group}, head_dim 128, window 128 (served launch: {served})")
    print("| launch | registers | spill stores (bytes) | shared memory (KiB) |\n| --- | --- | --- | --- |")
    for launch in launches.split(","):
        block_m, block_n, warps = map(int, launch.split("x"))
        r = build(args.group, block_m, block_n, warps)
        print(f"| {launch} | {r['registers']} | {r['spill_store_bytes']} | {r['shared_bytes'] / 1024:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
