"""benchmarks/plots.py draws every plot from the committed result JSON, and refuses a corrupt one loudly."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import plots  # noqa: E402  (needs matplotlib: the [data] extra, which install.sh installs)


@pytest.mark.parametrize("png,patterns,fn", plots.PLOTS, ids=[p[0] for p in plots.PLOTS])
def test_plot_from_committed_json(tmp_path, png, patterns, fn):
    """Each plot renders from the real JSON into a PNG file with real content, under the 150 KB budget."""
    import matplotlib.image

    paths = plots.inputs(RESULTS, patterns)
    assert paths, f"no {patterns[0]} in benchmarks/results/"
    out = tmp_path / png
    fn(paths, str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert 10_000 < len(data) < 150_000, f"{png}: {len(data)} bytes"
    pixels = matplotlib.image.imread(str(out))
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 900, pixels.shape
    rgb = pixels[..., :3]
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.03, "image is almost blank"
    assert (rgb.max(axis=-1) - rgb.min(axis=-1) > 0.25).mean() > 0.0005, "no coloured data marks (only axes and text)"


def test_corrupt_json_fails_the_script(tmp_path):
    """A result file that does not parse exits non-zero and names the file; missing files are skipped, not errors."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(os.path.join(RESULTS, "serve_h100_8192_256_all_formats.json"), results)
    (results / "throughput_h100_4096_1024_all_formats.json").write_text('{"benchmark": "throughput", "rows": [')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plots.py"), "--results", str(results),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "throughput_h100_4096_1024_all_formats.json is not valid JSON" in proc.stderr, proc.stderr
    assert "skip decode_attention_h100.png" in proc.stdout and "skip quality_vs_bits.png" in proc.stdout, proc.stdout
    assert (tmp_path / "out" / "serve_h100.png").exists(), "the good JSON next to the corrupt one was not plotted"
    assert not (tmp_path / "out" / "throughput_h100.png").exists()
