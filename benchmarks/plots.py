"""Regenerate the PNG plots from the result JSON under benchmarks/results/.

    python benchmarks/plots.py [--results DIR] [--out DIR]   # defaults: both benchmarks/results/

Writes throughput_h100.png / _h200.png / _h200_all_formats.png, throughput_vs_context_h200.png / _h200_rows.png,
decode_attention_h100.png / _h200.png / _h200_rows.png,
serve_h100.png / _h200.png and quality_vs_bits.png. A plot whose JSON is missing is skipped with a message; a JSON
that does not parse, or lacks a field the plot needs, exits 1.
Every title names the machine and model from the JSON, the JSON file itself and the command that wrote it.
"""

import argparse
import glob
import io
import json
import os
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import ROOT, _num, memory_settings  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
from serve import row_label  # noqa: E402

DPI = 100
PLAIN = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 10 else f"{v:g}")  # 0.3, 1, 4,000,000
MINOR = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else "")  # log axes: 2, 3, 5


def load(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("rows"), list):
        raise ValueError(f"{path} is not in the shared results shape (no 'rows' list)")
    return d


def _save(fig, what: str, data: list[tuple[str, dict]], out: str):
    """Title: what was measured, machine, model, then each JSON file with the command(s) that wrote it."""
    d0 = data[0][1]
    lines = [what, f"{d0['machine']}  |  {d0['model']}"]
    for path, d in data:
        cmds = "; ".join(v for k, v in d.items() if k.startswith("command"))
        caption = f"data: {os.path.relpath(path, ROOT)} (command: {cmds})"
        lines.append(textwrap.fill(caption, 150, break_on_hyphens=False))
    fig.suptitle("\n".join(lines), fontsize=8.5)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI)
    plt.close(fig)
    img = Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE)
    img.save(out, optimize=True)  # 256-colour PNG: a third of the size, colours kept within a few levels


def _auto_first(rows):
    return sorted(rows, key=lambda r: r["kv_cache_dtype"] != "auto")


def _color(name: str) -> str:
    return ("dimgray" if name.startswith(("auto", "bf16")) else "tab:blue" if name.startswith("fp8")
            else "tab:orange" if name.startswith("aquakv") else "tab:green")  # green: vLLM's sub-8-bit formats


def throughput(paths, out):
    d = load(paths[0])
    rows = _auto_first(d["rows"])
    names = [r["kv_cache_dtype"] for r in rows]
    many = len(rows) > 3  # long format names: a wider figure, slanted labels
    fig, axes = plt.subplots(1, 3, figsize=(18 if many else 12, 5.4 if many else 4.6), layout="constrained")
    for ax, key, ylabel in zip(axes, ("output_tokens_per_s", "total_tokens_per_s", "kv_tokens"),
                               ("output tokens/s", "total (input + output) tokens/s",
                                "KV-cache capacity, tokens (vLLM's report)")):
        base = rows[0].get(key) if names[0] == "auto" else None
        vals = [r.get(key) for r in rows]
        bars = ax.bar(names, [v or 0 for v in vals], color=[_color(n) for n in names])
        ax.bar_label(bars, [_num(v, ",.0f") + (f"\n{v / base:.2f}x auto" if v and base else "") for v in vals],
                     fontsize=8)
        ax.set(xlabel="--kv-cache-dtype", ylabel=ylabel)
        ax.yaxis.set_major_formatter(PLAIN)
        ax.margins(y=0.2)
        if many:
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    r0 = rows[0]
    _save(fig, f"vllm bench throughput, {r0['input_len']} in / {r0['output_len']} out, {r0['num_prompts']} prompts"
               f"{memory_settings(r0)}",
          [(paths[0], d)], out)


def throughput_vs_context(paths, out):
    """One line per format over the workloads of several throughput JSONs (prompt lengths, left to right): output
    tok/s and KV tokens, each relative to bf16 in the same run."""
    data = sorted(((p, load(p)) for p in paths), key=lambda pd: pd[1]["rows"][0]["input_len"])
    series = {}  # format -> [(workload index, output ratio, capacity ratio)]
    labels = []
    for i, (_, d) in enumerate(data):
        rows = _auto_first(d["rows"])
        base = rows[0]
        if base["kv_cache_dtype"] != "auto":
            raise ValueError("a throughput JSON without an auto (bf16) row cannot give ratios")
        labels.append(f"{base['input_len']} in / {base['output_len']} out\n{base['num_prompts']} prompts, "
                      f"memory {base['gpu_memory_utilization']}")
        for r in rows:
            if r.get("output_tokens_per_s") and r.get("kv_tokens"):
                series.setdefault(r["kv_cache_dtype"], []).append(
                    (i, r["output_tokens_per_s"] / base["output_tokens_per_s"], r["kv_tokens"] / base["kv_tokens"]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), layout="constrained")
    for ax, k, ylabel in zip(axes, (1, 2), ("output tok/s vs bf16 (same run)", "KV-cache tokens vs bf16 (same run)")):
        for name, pts in series.items():
            xs, ys = [p[0] for p in pts], [p[k] for p in pts]
            ax.plot(xs, ys, marker="o" if len(pts) > 1 else "x", color=_color(name), label=name)
            for x, y in zip(xs, ys):
                if len(pts) > 1:  # formats measured at one length only: marker and legend, no label
                    ax.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                                fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set(ylabel=ylabel)
        ax.margins(x=0.15, y=0.2)
        ax.legend(fontsize=8)
    _save(fig, "vllm bench throughput by prompt length (each workload's ratios from one run)", data, out)


def decode_attention(paths, out):
    d = load(paths[0])
    rows = d["rows"]
    labels = list(dict.fromkeys(r["kv_cache_dtype"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    many = len(labels) > 10  # (a legend of two columns under the plots, 20 distinct colours)
    fig, axes = plt.subplots(1, len(batches), figsize=(12, 5 + (0.15 * len(labels) if many else 0)),
                             layout="constrained", squeeze=False)
    for ax, b in zip(axes[0], batches):
        for i, lab in enumerate(labels):
            pts = sorted((r["context"], r["ms"]) for r in rows if r["batch"] == b and r["kv_cache_dtype"] == lab)
            bf16 = lab.startswith("bf16")
            ax.plot(*zip(*pts), marker="s" if bf16 else "o", ms=5, label=lab,
                    color="black" if bf16 else plt.get_cmap("tab20")(i % 20) if many else f"C{i}",
                    lw=3 if bf16 else 1.2, ls="-" if bf16 or lab.startswith("aquakv") else "--",
                    zorder=3 if bf16 else 2)
        ax.set(xscale="log", yscale="log", title=f"batch {b}", xlabel="context, tokens")
        ax.set_xticks(contexts, [f"{c // 1024}k" for c in contexts], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(PLAIN)
        ax.yaxis.set_minor_formatter(MINOR)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("decode attention time, ms (one layer, log scale)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=2 if many else 3, fontsize=8)
    _save(fig, "Decode attention time per step vs context, one layer (bf16 = thick black line; lower is faster)",
          [(paths[0], d)], out)


def _wrap(name: str, width: int = 12) -> str:
    """A tick label in lines of about ``width`` (tick labels side by side): a format name broken after its middle
    underscore where longer, what follows it in parentheses (``row_label``) wrapped at spaces."""
    name, _, rest = name.partition(" (")
    cuts = [i for i, ch in enumerate(name) if ch == "_"]
    if len(name) > width and cuts:
        cut = min(cuts, key=lambda i: abs(i - len(name) / 2)) + 1
        name = name[:cut] + "\n" + name[cut:]
    return name + ("\n" + "\n".join(textwrap.wrap("(" + rest, width + 4)) if rest else "")


def serve(paths, out):
    d = load(paths[0])
    rows = _auto_first(d["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.3 * len(rows)), 4.6), layout="constrained")
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for j, (p, color) in enumerate((("p50", "tab:cyan"), ("p99", "tab:purple"))):
            vals = [r.get(f"{p}_{metric}_ms") for r in rows]
            bars = ax.bar([i + (j - 0.5) * 0.38 for i in range(len(rows))], [v or 0 for v in vals], 0.38,
                          color=color, label=p)
            ax.bar_label(bars, [_num(v, ".2f" if metric == "tpot" else ".1f") for v in vals], fontsize=8)
        ax.set_xticks(range(len(rows)), [f"{_wrap(row_label(r, rows, rows[0]['num_prompts']))}\n"
                                         f"({'no server' if 'failed' not in r else str(r['failed']) + ' failed'})"
                                         for r in rows], fontsize=8)
        ax.set(xlabel="--kv-cache-dtype", ylabel=f"{metric.upper()}, ms")
        ax.margins(y=0.15)
        shown = [r.get(f"{p}_{metric}_ms") for r in rows for p in ("p50", "p99") if r.get(f"{p}_{metric}_ms")]
        if shown and max(shown) > 50 * min(shown):  # e.g. a failed run's seconds beside others' milliseconds
            ax.set_yscale("log")
        ax.legend(loc="upper left")
    r0 = rows[0]
    _save(fig, f"vllm bench serve, {r0['input_len']} in / {r0['output_len']} out at {r0['request_rate']} req/s, "
               f"{r0['num_prompts']} prompts: time to first token and time per output token", [(paths[0], d)], out)


def _vllm_format_rows(d: dict) -> list[dict]:
    """aquakv-eval rows of vLLM's own formats (``calibration/vllm_formats.py``) as Pareto rows."""
    from vllm_aquakv.calibration.vllm_formats import FORMATS

    return [{**r, "label": f"vLLM {r['kv_cache_dtype']} (simulated)", "semantics": "serving"} for r in d["rows"]
            if r.get("kv_cache_dtype") in FORMATS]


def quality(paths, out):
    data = [(p, load(p)) for p in paths]
    rows, seen = [], set()
    for _, d in data:  # later files add only configurations the first does not have (same label = same result)
        d_rows = d["rows"] if "label" in d["rows"][0] else _vllm_format_rows(d)
        rows += [r for r in d_rows if (r["label"], r["semantics"]) not in seen]
        seen |= {(r["label"], r["semantics"]) for r in d_rows}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    bits = {lab: next(r["bits_per_value"] for r in rows if r["label"] == lab) for lab in labels}
    fig, ax = plt.subplots(figsize=(13, 6.2), layout="constrained")
    for i, lab in enumerate(labels):
        group = [x for x in labels if bits[x] == bits[lab]]  # dodge configurations that share a bits value
        dx = 0.01 * (group.index(lab) - (len(group) - 1) / 2)
        for r in (r for r in rows if r["label"] == lab):
            xy = (r["bits_per_value"] + dx, 100 * r["rel_ppl_delta"])
            ax.scatter(*xy, s=40, color=plt.cm.tab20(i % 20), marker="o" if r["semantics"] == "serving" else "^",
                       edgecolors="black", linewidths=0.4,
                       label=f"{i + 1}  {lab}" if r["semantics"] == rows[0]["semantics"] else None)
            ax.annotate(str(i + 1), xy, xytext=(3, 3), textcoords="offset points", fontsize=6.5)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=min(-1.5, 150 * min(r["rel_ppl_delta"] for r in rows)))
    ax.yaxis.set_major_formatter(PLAIN)
    ax.set(xlabel="bits per cached value (codes + scales; same-bits points dodged by up to 0.06 for legibility)",
           ylabel="perplexity increase vs unquantized, % (symlog: linear within +-1%)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right lower", fontsize=7.5, title="configuration (color, number)", title_fontsize=8)
    ax.add_artist(ax.legend(handles=[
        Line2D([], [], ls="", marker="o", color="gray", label="serving: every token through codes"),
        Line2D([], [], ls="", marker="^", color="gray",
               label="paper: 16-bit 4 sinks + 128-token window (not in bits)")],
        loc="lower right", fontsize=8, title="semantics (marker)"))
    _save(fig, f"Perplexity increase vs bits/value (unquantized ppl {_num(data[0][1].get('unquantized_ppl'), '.3f')})",
          data, out)


# output PNG, input patterns (the first required, the rest optional), plot function
PLOTS = [("throughput_h100.png", ["throughput_h100_4096_1024_all_formats.json"], throughput),  # one machine session
         ("throughput_h200.png", ["throughput_h200_8192_512_vs_fp8.json"], throughput),  # bf16, fp8, aquakv: one machine
         # every vLLM KV format and aquakv in one machine session, in 0.2 of the memory
         ("throughput_h200_all_formats.png", ["throughput_h200_8192_512_all_formats.json"], throughput),
         ("throughput_vs_context_h200.png", ["throughput_h200_4096_1024.json",
                                             "throughput_h200_8192_512_all_formats.json",
                                             "throughput_h200_16384_512.json"], throughput_vs_context),
         ("throughput_vs_context_h200_rows.png", ["throughput_h200_4096_1024_rows.json",  # 4-row decode programs
                                                  "throughput_h200_8192_512_rows.json"], throughput_vs_context),
         ("decode_attention_h100.png", ["decode_attention_h100.json"], decode_attention),
         ("decode_attention_h200.png", ["decode_attention_h200.json"], decode_attention),
         ("decode_attention_h200_rows.png", ["decode_attention_h200_rows.json"], decode_attention),  # 4 vs 16 rows
         ("serve_h100.png", ["serve_h100_8192_256_all_formats.json"], serve),
         ("serve_h100_k3v4_quality.png", ["serve_h100_8192_256_k3v4_quality.json"], serve),
         ("serve_h200.png", ["serve_h200_8192_256_same_run.json"], serve),
         ("quality_vs_bits.png", ["pareto_smollm2.json", "pareto_smollm2_fused_modes.json",
                                  "eval_smollm2_vllm_formats.json"], quality)]


def inputs(results: str, patterns: list[str]) -> list[str]:
    """One file per pattern (the last in sorted order), dropping patterns with no match."""
    found = [sorted(glob.glob(os.path.join(results, p))) for p in patterns]
    for p, m in zip(patterns, found):
        if len(m) > 1:
            print(f"note: {len(m)} files match {p}; plotting {os.path.basename(m[-1])}")
    return [m[-1] for m in found if m] if found[0] else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(ROOT, "benchmarks", "results")
    ap.add_argument("--results", default=default, help="folder of result JSON (default %(default)s)")
    ap.add_argument("--out", default=default, help="folder for the PNGs (default %(default)s)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rc = 0
    for png, patterns, fn in PLOTS:
        paths = inputs(args.results, patterns)
        if not paths:
            print(f"skip {png}: no {patterns[0]} in {args.results}")
            continue
        try:
            fn(paths, os.path.join(args.out, png))
        except (ValueError, KeyError, IndexError) as e:
            print(f"error: cannot plot {png} from {', '.join(paths)}: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
            continue
        print(f"wrote {os.path.join(args.out, png)} ({os.path.getsize(os.path.join(args.out, png)) // 1024} KB)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
