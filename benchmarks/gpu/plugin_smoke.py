"""GPU smoke test of the plugin on vLLM 0.26 + CUDA (torch serving path; no Triton kernels yet).

Builds a random-weight Llama-3.2-3B-shaped model on the GPU, calibrates an artifact on random token text
(predictors are meaningless on random weights: this checks plumbing, not quality), then runs LLM(...) with
kv_cache_dtype aquakv and auto at equal --gpu-memory-utilization and records vLLM's KV-cache token counts, the
generated tokens and wall times.  Run on the device machine (see benchmarks/gpu/README.md):

    python3 benchmarks/gpu/plugin_smoke.py $OUT
"""

import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/out"
    from vllm_runner import run_vllm
    from vllm_aquakv.calibration.models import make_tiny_llama

    model = "/tmp/llama3b-shape"
    t0 = time.time()
    if not os.path.exists(os.path.join(model, "config.json")):
        make_tiny_llama(model, num_layers=28, hidden=3072, heads=24, kv_heads=8, head_dim=128, vocab=128256,
                        ffn=8192, device="cuda")
    made = time.time() - t0
    words = os.path.join("/tmp", "calib.txt")
    with open(words, "w") as f:
        g = torch.Generator().manual_seed(0)
        f.write(" ".join("w" + str(int(i)) for i in torch.randint(0, 5000, (20000,), generator=g)))
    t1 = time.time()
    subprocess.run([sys.executable, "-m", "vllm_aquakv.calibration.calibrate", model, "--text-file", words,
                    "--tokens", "4096", "--seq-len", "512", "--device", "cuda"], check=True, cwd="/tmp")
    calibrated = time.time() - t1
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 120000, (n,), generator=g).tolist() for n in (200, 333, 517)]
    result = {"model": "Llama-3.2-3B shape, random bf16 weights", "seconds_make_model": made,
              "seconds_calibrate": calibrated, "runs": {}}
    for dtype in ("aquakv", "auto"):
        t = time.time()
        r = run_vllm(model=model, kv_cache_dtype=dtype, dtype="bfloat16", max_model_len=4096, block_size=16,
                     prompt_token_ids=prompts, max_tokens=48,
                     engine={"gpu_memory_utilization": 0.5, "skip_tokenizer_init": True})
        r["seconds"] = time.time() - t
        result["runs"][dtype] = r
        print(dtype, "kv_tokens", r["kv_tokens"], "seconds", round(r["seconds"], 1), flush=True)
    a, b = result["runs"]["aquakv"], result["runs"]["auto"]
    result["capacity_ratio"] = a["kv_tokens"] / b["kv_tokens"]
    result["same_greedy_tokens_as_auto"] = [x == y for x, y in zip(a["outputs"], b["outputs"])]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "plugin_smoke.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
