"""The README's GPU performance tables are generated from the result JSON and kept in sync with it."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tables_match_the_result_json():
    """`benchmarks/report.py --check` passes on the repo: README.md says what the JSON says."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_block_follows_the_json(tmp_path):
    """A changed figure in a result file changes the generated block (the tables are not hand-written)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from report import perf_block

    results = tmp_path / "results"
    shutil.copytree(os.path.join(ROOT, "benchmarks", "results"), results)
    before = perf_block(str(results))
    path = next(results.glob("throughput_h100_*.json"))
    data = json.loads(path.read_text())
    data["rows"][0]["output_tokens_per_s"] = 98765.4
    path.write_text(json.dumps(data))
    after = perf_block(str(results))
    assert "98,765.4" in after and "98,765.4" not in before


def test_gpu_tag_names_result_files_by_gpu_model():
    """Result files are named by GPU model (throughput_h100_..., serve_h200_...), not by the name's last word."""
    from vllm_aquakv.results import gpu_tag

    assert gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_tag("NVIDIA H200") == "h200"
    assert gpu_tag("NVIDIA A100-SXM4-80GB") == "a100"
