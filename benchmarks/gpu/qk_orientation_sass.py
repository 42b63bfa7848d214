"""Offline SASS probe (no GPU): does swapping the decode QK dot's operands cut instructions?  A toy loop with the
decode kernel's shapes (128-token tiles of uniform 2-bit codes, 4 lanes of 32 code bytes, masked in place as
``kernels/attention._uniform_lane`` does, a max-and-exp2 per tile) computes the scores two ways: q [M, 32] as the
MMA's A operand (``kernels/attention.py`` today: s = q @ x^T) and codes as A (s^T = x @ q^T, M = 16 or 8 query rows).
Prints registers and the loop's instruction mix per orientation (Triton's bundled ptxas and cuobjdump, sm_90a).

    PYTHONPATH=/tmp/t36 python benchmarks/gpu/qk_orientation_sass.py   # Triton 3.6, as on the GPU image
"""
import os
import sys

import triton
import triton.language as tl
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_compile import compile_sm90, loop_mix  # noqa: E402


@triton.jit
def lane(byte, I: tl.constexpr):
    """Lane I of uniform 2-bit codes as float16 subnormals (c 4^I units), as ``_uniform_lane`` with INDEX_BITS 0."""
    return (byte & (3 << (2 * I))).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def qk_kernel(q_ptr, c_ptr, out_ptr, n_tiles, SWAP: tl.constexpr, M: tl.constexpr, T: tl.constexpr):
    """Scores of M query rows against n_tiles tiles of T tokens (68-byte slots), q as A or (SWAP) codes as A."""
    rows = tl.arange(0, M)
    b = tl.arange(0, 32)
    q0 = tl.load(q_ptr + rows[:, None] * 128 + b[None, :])
    q1 = tl.load(q_ptr + rows[:, None] * 128 + 32 + b[None, :])
    q2 = tl.load(q_ptr + rows[:, None] * 128 + 64 + b[None, :])
    q3 = tl.load(q_ptr + rows[:, None] * 128 + 96 + b[None, :])
    t0 = tl.arange(0, T)
    if SWAP:
        acc = tl.zeros([T, M], tl.float32)
        q0t, q1t, q2t, q3t = tl.trans(q0), tl.trans(q1), tl.trans(q2), tl.trans(q3)
    else:
        acc = tl.zeros([M, T], tl.float32)
    for tile in range(n_tiles):
        t = tile * T + t0
        byte = tl.load(c_ptr + t[:, None] * 68 + b[None, :])
        x0, x1, x2, x3 = lane(byte, 0), lane(byte, 1), lane(byte, 2), lane(byte, 3)
        if SWAP:
            s = tl.dot(x0, q0t)
            s = tl.dot(x1, q1t, s)
            s = tl.dot(x2, q2t, s)
            s = tl.dot(x3, q3t, s)
            acc += tl.exp2(s - tl.max(s, axis=0)[None, :])
        else:
            s = tl.dot(q0, tl.trans(x0))
            s = tl.dot(q1, tl.trans(x1), s)
            s = tl.dot(q2, tl.trans(x2), s)
            s = tl.dot(q3, tl.trans(x3), s)
            acc += tl.exp2(s - tl.max(s, axis=1)[:, None])
    if SWAP:
        tl.store(out_ptr + t0[:, None] * M + rows[None, :], acc)
    else:
        tl.store(out_ptr + rows[:, None] * T + t0[None, :], acc)

def build(swap, m, stages=3):
    """Compile one orientation for sm_90a and print its registers and loop instruction mix."""
    names = qk_kernel.arg_names
    sig = {"q_ptr": "*fp16", "c_ptr": "*u8", "out_ptr": "*fp32", "n_tiles": "i32", "SWAP": "constexpr", "M": "constexpr", "T": "constexpr"}
    const = dict(SWAP=swap, M=m, T=128)
    src = ASTSource(qk_kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ("q_ptr", "c_ptr", "out_ptr")})
    _, info, sass = compile_sm90(src, {"num_warps": 4, "num_stages": stages}, f"/tmp/aquakv-qk-orientation/{swap}_{m}",
                                 sass=True)
    print(f"codes as A: {swap}, M {m}:", *info, "\n" + "\n".join(loop_mix(sass).splitlines()[:9]))


if __name__ == "__main__":
    for swap, m in ((False, 16), (True, 16), (True, 8)):
        build(swap, m)
