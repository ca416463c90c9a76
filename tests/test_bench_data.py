"""benchmarks/bench_data.py keeps working: its --segmentation mode at a tiny size (timings are not checked)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def test_bench_data_segmentation_smoke(tmp_path):
    out = tmp_path / "data.md"
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_data.py"), "--segmentation",
                          "--images", "6", "--epochs", "1", "--batch-size", "2", "--workers", "0",
                          "--seg-size", "128x64", "--size", "64", "--dir", str(tmp_path / "work"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "| loader | images/s (median) | min | max | vs folder | first batch (ms) |" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "loader" not in line]
    assert [r[0].strip() for r in rows] == [".beton (png, the PNG files as they are)", ".beton (jpg q95, lossy)",
                                            "Cityscapes folder (PNG files), reference"]
    assert all(float(r[1]) > 0 for r in rows)
    assert rows[-1][4].strip() == "1.00x"
    assert "6 synthetic Cityscapes images, 128x64 RGB PNG" in text
    work = tmp_path / "work" / "cityscapes-128x64-6"
    assert len(list(work.glob("leftImg8bit/train/*/*_leftImg8bit.png"))) == 6
    assert len(list(work.glob("gtFine/train/*/*_gtFine_labelIds.png"))) == 6
