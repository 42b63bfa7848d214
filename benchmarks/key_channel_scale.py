"""What the key channel scale (``aquakv-calibrate --key-channel-scale query``) does to perplexity, per preset and text.

For each preset (speed, quality) and key channel scale (query, none): ``aquakv-calibrate MODEL --preset P
--key-channel-scale S --tokens N --out WORK/P-S``, then ``aquakv-eval MODEL --artifact WORK/P-S --text T --windows W
--no-baselines --retrieval-ctx 0 --json WORK/eval-P-S-T.json`` for each held-out text: the real CLI commands, so the
rows are what a user's artifacts give.  Existing artifacts and eval files in WORK are reused (delete them to rerun).

    .venv/bin/python benchmarks/key_channel_scale.py [--model DIR] [--tokens 16384] [--windows 4]
        [--presets speed,quality] [--texts wiki-heldout,essays,news] [--quality-texts wiki-heldout,essays]
        [--work /tmp/aquakv-key-scale] [--out benchmarks/results/eval_smollm2_speed_key_scale.json]

Prints and writes one table (JSON + markdown, shared RESULTS.md shape): perplexity change against the unquantized
cache under aquakv-eval's four cache semantics (every token as codes; sinks only; window only; sinks 4 + window 128,
what vLLM serves by default).  SmolLM2-135M-Instruct (the demo's model) by default; about 4 minutes per row on 2 CPU
cores.
"""

import argparse
import json
import os
import subprocess
import sys

from vllm_aquakv.calibration.models import smollm2_path
from vllm_aquakv.results import write_results

SCALES = ("query", "none")


def run(cmd: list[str], log: str) -> None:
    """Run one CLI command, its output into ``log``; a failure ends the benchmark with the log's tail."""
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = open(log).read()[-2000:]
        raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}); {log}:\n{tail}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local model folder (default: the demo's SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--presets", default="speed,quality")
    ap.add_argument("--texts", default="wiki-heldout,essays,news", help="held-out texts of the speed preset")
    ap.add_argument("--quality-texts", default="wiki-heldout,essays", help="held-out texts of the quality preset")
    ap.add_argument("--work", default="/tmp/aquakv-key-scale")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "eval_smollm2_speed_key_scale.json"))
    args = ap.parse_args()
    model = args.model or smollm2_path()
    bindir = os.path.dirname(sys.executable)
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for preset in args.presets.split(","):
        texts = (args.texts if preset == "speed" else args.quality_texts).split(",")
        for scale in SCALES:
            art = os.path.join(args.work, f"{preset}-{scale}")
            if not os.path.exists(os.path.join(art, "manifest.json")):
                run([os.path.join(bindir, "aquakv-calibrate"), model, "--preset", preset, "--key-channel-scale", scale,
                     "--tokens", str(args.tokens), "--out", art, "--overwrite"], art + ".log")
            for text in texts:
                out = os.path.join(args.work, f"eval-{preset}-{scale}-{text}.json")
                if not os.path.exists(out):
                    run([os.path.join(bindir, "aquakv-eval"), model, "--artifact", art, "--text", text, "--windows",
                         str(args.windows), "--no-baselines", "--retrieval-ctx", "0", "--json", out], out + ".log")
                these = [{"preset": preset, "key_channel_scale": scale, "text": text, "semantics": r["semantics"],
                          "bits_per_value": r["bits_per_value"], "bits_total": r["bits_total"], "ppl": r["ppl"],
                          "rel_ppl_delta": r["rel_ppl_delta"]}
                         for r in json.load(open(out))["rows"][1:]]  # (row 0: the unquantized cache)
                rows += these
                print(f"{preset} {scale} {text}: " + ", ".join(
                    f"{r['semantics'].split(' (')[0]} {100 * r['rel_ppl_delta']:+.2f}%" for r in these), flush=True)
    semantics = list(dict.fromkeys(r["semantics"] for r in rows))
    md = [f"Perplexity vs the unquantized cache (aquakv-eval, {args.windows} held-out windows x 1,024 tokens, fp32), "
          f"artifacts from `aquakv-calibrate --preset P --key-channel-scale S --tokens {args.tokens}` (wiki-train).\n",
          "| preset | key channel scale | text | bits/value | " + " | ".join(semantics) + " |",
          "| --- " * (4 + len(semantics)) + "|"]
    keys = list(dict.fromkeys((r["preset"], r["key_channel_scale"], r["text"]) for r in rows))
    for key in keys:
        cells = {r["semantics"]: r for r in rows if (r["preset"], r["key_channel_scale"], r["text"]) == key}
        bpv = next(iter(cells.values()))["bits_per_value"]
        md.append(f"| {key[0]} | {key[1]} | {key[2]} | {bpv:.3f} | " + " | ".join(
            f"{100 * cells[s]['rel_ppl_delta']:+.2f}%" if s in cells else "-" for s in semantics) + " |")
    print("\n".join(md))
    write_results(args.out, "eval", model, rows, "\n".join(md), tokens=args.tokens, windows=args.windows)


if __name__ == "__main__":
    main()
