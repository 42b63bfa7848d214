"""Compile kernels/decode_codes.cu for the H100 (sm_90a) without a GPU and print what ptxas says per configuration:
registers, spills, shared memory, and whether a spill (LDL / STL) sits inside the codes loop (between its first and
last HMMA).  A quick check of a kernel change before GPU time.

Needs NVRTC, which a CPU machine gets from PyPI:
    pip download nvidia-cuda-nvrtc-cu12 --only-binary :all: --no-deps -d /tmp/nvrtc && cd /tmp/nvrtc && unzip -o -q *.whl
then: .venv/bin/python benchmarks/gpu/cuda_offline_compile.py --nvrtc /tmp/nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12
(ptxas and cuobjdump come with Triton).  The GPU compiles the same source with torch's NVRTC for sm_90; its numbers
can differ slightly: benchmarks/gpu/decode_attention.py records the driver's (``cuda_decode.kernel_attributes``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from kernels.cuda_decode import DecodeConfig, SOURCE  # noqa: E402

LLAMA_3B = dict(group=3, num_q_heads=24, page_block=16, sinks=4, window=128, has_window=True, has_k_bias=True,
                has_k_scale=False, q_bf16=True, v_code_offset=32, k_scale_offset=64, stride_token=68)


def ptx(lib, config: DecodeConfig) -> str:
    """NVRTC's PTX of decode_codes.cu with ``config``'s #defines."""
    src = (config.defines() + SOURCE.read_text()).encode()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"decode_codes.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=compute_90", b"-default-device"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        raise RuntimeError(f"NVRTC: {log.value.decode()}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    out = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, out)
    return out.value.decode()


def report(lib, name: str, config: DecodeConfig, tools: str) -> str:
    """One line: ptxas -v's numbers and spills inside the codes loop."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx(lib, config))
        res = subprocess.run([os.path.join(tools, "ptxas-blackwell"), "-arch=sm_90a", "-v", src, "-o", cubin],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    regs = re.search(r"Used (\d+) registers", res.stderr + res.stdout)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr + res.stdout)
    smem = re.search(r"(\d+) bytes smem", res.stderr + res.stdout)
    mma = [i for i, line in enumerate(sass) if "HMMA" in line]
    in_loop = sum(1 for line in sass[mma[0]:mma[-1]] if re.search(r"\b(LDL|STL)\b", line)) if mma else 0
    return (f"{name:28s} registers {regs.group(1) if regs else '?':>4}  spill stores/loads "
            f"{spill.group(1) if spill else '?'}/{spill.group(2) if spill else '?'} bytes  smem "
            f"{smem.group(1) if smem else '?'}  spills in the codes loop: {in_loop}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nvrtc", default="/tmp/nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12", help="libnvrtc.so path")
    args = ap.parse_args()
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    lib = ctypes.CDLL(args.nvrtc)
    variants = {"three launches, window": dict(fused=False),
                "three launches, no window": dict(fused=False, has_window=False, sinks=0, window=0),
                "one launch, window": dict(fused=True, out_kind=1),
                "one launch, no window": dict(fused=True, out_kind=1, has_window=False, sinks=0, window=0, has_v_bias=True),
                "one launch, GQA 4:1": dict(fused=True, group=4, num_q_heads=32, out_kind=1),
                "one launch, GQA 8:1, fp16": dict(fused=True, group=8, num_q_heads=64, q_bf16=False, ring_bf16=False,
                                                  out_kind=2)}
    for name, change in variants.items():
        print(report(lib, name, DecodeConfig(**{**LLAMA_3B, **change}), tools), flush=True)


if __name__ == "__main__":
    main()
