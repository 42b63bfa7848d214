"""Compile the fused attention kernel for the H100 (sm_90a) without a GPU and print what ptxas says: registers,
spills, shared memory.  Runs on the CPU machine (Triton's bundled ptxas); a quick check of a kernel change before
spending device time.  Pointer arguments are compiled 16-byte aligned, as torch allocations are at launch.

    python benchmarks/gpu/offline_compile.py [--tile 128] [--warps 4] [--stages 1] [--rows 4] [--maxnreg N]
        [--plain] [--dump DIR] [--write]

``--sass`` also prints the instruction mix of the kernel's innermost loop (one key tile) from the bundled
``cuobjdump``: what the loop spends its issue slots on.  ``--write`` compiles the cache write (kernels/cache_write.py, 16 tokens per program) instead of the attention,
``--combine`` the split-K combine of a decode step, ``--ring-step`` the 16-bit ring's step bookkeeping.
To check against the GPU image's Triton (3.6), install it beside the venv's and put it first on the path:
``pip install --target /tmp/t36 triton==3.6.0 --no-deps; PYTHONPATH=/tmp/t36 python benchmarks/gpu/offline_compile.py``.

``--rows 4`` is a decode launch (one query token x G=3 heads, padded to 4: ``DECODE_MIN_ROWS``; 16 was the
decode launch before 2026-12-04), 64 a prefill launch; ``--plain`` drops the
key mean and the value predictor (plain HIGGS); ``--d1n4`` compiles d1n4 codes (register decode), ``--u1n4 0|1`` uniform codes (the speed preset).  Shapes: Llama-3.2-3B (24 q / 8 KV heads, head_dim 128), d2n16 keys
and values, blocks of 16.
"""

import argparse
import collections
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_aquakv.kernels import attention, cache_write, window_step

POINTERS = {"q_ptr": "*bf16", "sign_k_ptr": "*fp16", "k_bias_ptr": "*fp32", "cache_ptr": "*u8", "block_table_ptr": "*i32",
            "seq_lens_ptr": "*i32", "q_start_ptr": "*i32", "qblock_seq_ptr": "*i32", "qblock_first_ptr": "*i32",
            "k_table_ptr": "*i32", "v_table_ptr": "*i32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_v_ptr": "*fp32",
            "acc_k_ptr": "*fp32", "acc_x_ptr": "*fp32", "ring_k_ptr": "*bf16", "ring_v_ptr": "*bf16", "tags_ptr": "*i64",
            "key_ptr": "*bf16", "value_ptr": "*bf16", "k_dinv_ptr": "*fp32"}

WRITE_POINTERS = {"key_ptr": "*bf16", "value_ptr": "*bf16", "slot_ptr": "*i64", "cache_ptr": "*u8",
                  "rot_k_ptr": "*fp32", "rot_v_ptr": "*fp32", "sign_k_ptr": "*fp16", "sign_v_ptr": "*fp16",
                  "k_shift_ptr": "*fp32", "v_shift_ptr": "*fp32", "k_bias_ptr": "*fp32", "v_bias_ptr": "*fp32",
                  "v_from_k_ptr": "*fp32", "k_grid_ptr": "*fp32", "v_grid_ptr": "*fp32", "ring_k_ptr": "*bf16",
                  "ring_v_ptr": "*bf16", "ring_row_ptr": "*i64", "ring_col_ptr": "*i64", "k_channel_scale_ptr": "*fp32"}
WRITE_CONSTANTS = dict(HEAD_DIM=128, PAGE_BLOCK=16, BLOCK_N=16, K_LANES=4, K_CODE_BYTES=32, K_CODE_BITS=4, K_D=2,
                       K_POINTS=16, V_LANES=4, V_CODE_BYTES=32, V_CODE_BITS=4, V_D=2, V_POINTS=16, V_CODE_OFFSET=32,
                       K_SCALE_OFFSET=64, V_SCALE_OFFSET=66, HAS_K_BIAS=True, HAS_V_BIAS=True, V_FROM_K=True,
                       HAS_RING=False, RING_WIDTH=132, NUM_KV_HEADS=8, SPLIT_STREAMS=False, EXACT=False,
                       X_DOT=triton.language.float32, HAS_K_SCALE=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--d1n4", action="store_true", help="d1n4 keys and values (register decode)")
    ap.add_argument("--u1n4", type=int, default=None, choices=(0, 1),
                    help="uniform 2-bit keys and values (the speed preset), decoded as subnormals (0) or via 1024 (1)")
    ap.add_argument("--qk-int8", action="store_true", help="with --u1n4 --plain: scores on int8 tensor cores")
    ap.add_argument("--window", action="store_true", help="16-bit sinks 4 + window 128 (needs --plain)")
    ap.add_argument("--ring-only", action="store_true", help="with --window and decode rows: the ring launch, not the "
                    "codes launch")
    ap.add_argument("--ring-programs", type=int, default=0, help="with --window and decode rows: the ring in this "
                    "many programs of the codes launch after its segments (AttentionPlan.ring_programs)")
    ap.add_argument("--no-asm", action="store_true", help="register decode by integer selects, not PTX")
    ap.add_argument("--dump", default=None, help="write the ttgir and ptx here")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--block-n", type=int, default=16, help="with --write: tokens per program (write_fused's block_n)")
    ap.add_argument("--exact-inputs", action="store_true", help="with --write: write_fused(exact_inputs=True)")
    ap.add_argument("--key-scale", action="store_true", help="keys with a channel scale (artifacts of "
                    "aquakv-calibrate --key-channel-scale query)")
    ap.add_argument("--sass", action="store_true", help="print the innermost loop's instruction mix")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M's shapes: 9 q / 3 KV heads, head_dim 64, "
                                                          "blocks of 32")
    ap.add_argument("--combine", action="store_true", help="compile the split-K combine of a decode step (16 rows) "
                    "instead; it launches with --warps 8")
    ap.add_argument("--ring-step", action="store_true", help="compile the 16-bit ring's step bookkeeping "
                    "(kernels/window_step.py, aquakv_fused_ring_step) instead")
    args = ap.parse_args()
    fn, pointers, const = (ring_step_launch() if args.ring_step else combine_launch(args) if args.combine
                           else attention_or_write_launch(args))
    names = fn.arg_names
    signature = {n: pointers.get(n, "fp32" if n == "logit_scale" else "i32") for n in names}
    signature.update({k: "constexpr" for k in const})
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in pointers})
    options = {"num_warps": args.warps, "num_stages": args.stages}
    if args.maxnreg:
        options["maxnreg"] = args.maxnreg
    kernel, info, sass = compile_sm90(src, options, args.dump or "/tmp/aquakv-offline-compile", args.sass)
    print(f"tile {args.tile} warps {args.warps} stages {args.stages} rows {args.rows} maxnreg {args.maxnreg} "
          f"plain {args.plain} combine {args.combine}: shared {kernel.metadata.shared} B; " + "; ".join(info))
    if args.sass:
        print(loop_mix(sass))


def ring_step_launch() -> tuple:
    """(kernel, pointer types, constants) of ``window_step._begin_step_kernel`` (sinks 4 + window 128, vLLM's int32
    block table / lengths / query starts, int64 slots and ring state)."""
    fn = window_step._begin_step_kernel
    pointers = {n: "*i32" if n in ("block_table_ptr", "seq_lens_ptr", "qsl_ptr") else "*i64"
                for n in fn.arg_names if n.endswith("_ptr")}
    const = dict(SINKS=4, WINDOW=128, WIDTH_P2=256, PAGE_BLOCK=16, BLOCK_T=window_step.BLOCK_T)
    return fn, pointers, const


def combine_launch(args) -> tuple:
    """(kernel, pointer types, constants) of a decode step's split-K combine (``--combine``)."""
    fn = attention._combine_kernel
    pointers = {n: "*bf16" if n == "out_ptr" else "*fp16" if n.startswith("sign") else "*fp32"
                for n in fn.arg_names if n.endswith("_ptr")}
    const = dict(G=3, NUM_Q_HEADS=24, HEAD_DIM=128, ROWS=16, HAS_V_BIAS=not args.plain, HAS_K_BIAS=not args.plain,
                 V_FROM_K=not args.plain, HAS_WINDOW=args.window, RING_ROWS=1 if args.window else 0,
                 STEP=attention.COMBINE_STEP, DOT_DTYPE=triton.language.float16, HAS_K_SCALE=args.key_scale)
    return fn, pointers, const


def attention_or_write_launch(args) -> tuple:
    """(kernel, pointer types, constants) of the fused attention launch, or of the cache write (``--write``)."""
    fn = cache_write._cache_write_kernel if args.write else attention._fused_attention_kernel
    pointers = WRITE_POINTERS if args.write else POINTERS
    decode = args.rows <= 16  # one query token per program (plan_attention's decode rows), else a prefill launch
    const = dict(WRITE_CONSTANTS) if args.write else dict(G=3, NUM_Q_HEADS=24, BLOCK_Q=1 if decode else args.rows // 3, BLOCK_M=args.rows,
                 TILE=args.tile, HEAD_DIM=128, PAGE_BLOCK=16, SLOT_ALIGN=4, K_CODE_BYTES=32, K_INDEX_BITS=4,
                 K_ENTRY_VALUES=2, K_LANES=4, V_CODE_OFFSET=32, V_CODE_BYTES=32, V_INDEX_BITS=4, V_ENTRY_VALUES=2,
                 V_LANES=4, K_SCALE_OFFSET=64, V_SCALE_OFFSET=66, HAS_K_BIAS=not args.plain,
                 V_FROM_K=not args.plain, DOT_DTYPE=triton.language.float16, Q_DTYPE=triton.language.bfloat16,
                 Q_PRECISION="tf32", USE_ASM=not args.no_asm, NUM_KV_HEADS=8, SINKS=4 if args.window else 0,
                 WINDOW=128 if args.window else 0, HAS_WINDOW=args.window,
                 RING_FIRST=args.window and decode, RING_ONLY=args.ring_only,
                 RING_PROGRAMS=args.ring_programs if args.window and decode else 0,
                 RING_CHUNK=attention.ring_chunk(132, args.ring_programs), RING_TILE=attention.RING_TILE)
    if args.write and args.window:  # the cache write that also stores the 16-bit ring entries
        const.update(HAS_RING=True)
    if args.write and args.u1n4 is not None:  # the speed preset's write: u1n4 codes, key mean, keys and values in
        # programs of their own (write_fused's default without a value predictor)
        const.update(K_CODE_BITS=2, K_D=1, K_POINTS=4, V_CODE_BITS=2, V_D=1, V_POINTS=4, HAS_V_BIAS=False,
                     V_FROM_K=False, SPLIT_STREAMS=True)
    if args.write:
        const.update(BLOCK_N=args.block_n)
    const.update(HAS_K_SCALE=args.key_scale)
    if args.write and args.exact_inputs:  # write_fused(exact_inputs=True): bf16 inputs rotated on 16-bit cores
        const.update(EXACT=True, X_DOT=triton.language.bfloat16)
    if args.smollm2 and not args.write:  # d2n16: 16 code bytes per stream, slot 16 + 16 + 2 + 2 bytes
        const.update(NUM_Q_HEADS=9, NUM_KV_HEADS=3, HEAD_DIM=64, PAGE_BLOCK=32, K_CODE_BYTES=16, V_CODE_OFFSET=16,
                     V_CODE_BYTES=16, K_SCALE_OFFSET=32, V_SCALE_OFFSET=34)
    if args.d1n4 and not args.write:  # 2-bit scalar codes decoded in registers
        const.update(K_INDEX_BITS=2, K_ENTRY_VALUES=1, V_INDEX_BITS=2, V_ENTRY_VALUES=1)
    if args.u1n4 is not None and not args.write:  # uniform 2-bit codes: arithmetic decode, (g0, step) tables
        const.update(K_INDEX_BITS=args.u1n4, K_ENTRY_VALUES=1, V_INDEX_BITS=args.u1n4, V_ENTRY_VALUES=1)
        pointers = dict(pointers, k_table_ptr="*fp32", v_table_ptr="*fp32")
        const.update(QK_INT8=args.qk_int8)
    return fn, pointers, const


def compile_sm90(src, options: dict, out: str, sass: bool = False):
    """Compile a Triton ASTSource for sm_90a (no GPU needed), assemble its PTX with Triton's bundled ptxas into
    ``out``/kernel.cubin; returns (the compiled kernel, ptxas's register/spill lines, the SASS or "")."""
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    os.makedirs(out, exist_ok=True)
    for ext in ("ttgir", "ptx"):
        with open(os.path.join(out, f"kernel.{ext}"), "w") as f:
            f.write(kernel.asm[ext])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    res = subprocess.run([ptxas, "-arch=sm_90a", "-v", os.path.join(out, "kernel.ptx"), "-o",
                          os.path.join(out, "kernel.cubin")], capture_output=True, text=True)
    info = [line.split("info    : ")[-1].strip() for line in res.stderr.splitlines()
            if "registers" in line or "spill" in line]
    code = ""
    if sass:
        cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
        code = subprocess.run([cuobjdump, "-sass", os.path.join(out, "kernel.cubin")], capture_output=True,
                              text=True, check=True).stdout
    return kernel, info, code


def loop_mix(sass: str) -> str:
    """Instruction counts (per warp) of the innermost loop: the body of the shortest backward branch."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    loops = []
    for addr, text in ins:
        target = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loops.append((addr - int(target.group(1), 16), int(target.group(1), 16), addr))
    if not loops:
        return "no loop found"
    _, lo, hi = min(loops)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for a, t in ins if lo <= a <= hi)
    total = sum(ops.values())
    return f"innermost loop: {total} instructions per warp per tile\n" + "\n".join(
        f"  {op:8s} {n:5d}  {100 * n / total:4.1f}%" for op, n in ops.most_common(16))


if __name__ == "__main__":
    main()
