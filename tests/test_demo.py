"""The Fashion-MNIST demo end to end, shrunk: a few hundred real images, a few steps per run.

Same driver, same configs as ``make demo``; only the sizes are overridden.
"""
import json
import os

import numpy as np
import pytest
import torch

from fastkd import demo
from fastkd.data import fashion_mnist
from fastkd.data.idx import write_idx

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_environ")]


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory):
    """The four IDX files with 320 train / 160 test images cut from the real Fashion-MNIST."""
    try:
        src = fashion_mnist.locate(download_ok=False)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed ({exc}); `make sysdeps` installs it")
    out = tmp_path_factory.mktemp("fashion")
    for split, prefix, n in (("train", "train", 320), ("test", "t10k", 160)):
        images, labels = fashion_mnist.load(split, src)
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[:n].astype(np.uint8))
    return out


def args(data, out, *more):
    # The PyTorch loader over the IDX files: FFCV compiles its pipelines per loader (numba), which costs
    # more than these few steps; the .beton path is the default one `make demo` runs.
    return ["--device", "cpu", "--data-dir", str(data), "--out", str(out), "data.source=torch",
            "data.num_workers=0", "train.batch_size=32", "train.progress=false", *more]


def test_demo_end_to_end(tiny_fashion, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = demo.main(args(tiny_fashion, out, "train.max_steps=3", "train.log_every=1"))
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["teacher", "baseline", "mgd", "ct", "mgd_kd"]
    for r in results:
        assert 0.0 <= r["top1"] <= 100.0 and r["val_images"] == 160
        assert r["steps"] == 3 and r["images_per_s"] > 0 and r["wall_s"] > 0
        assert os.path.isfile(r["plot"]) and os.path.getsize(r["plot"]) > 1000
        assert r["run_dir"] in printed
    assert {r["model"] for r in results[1:]} == {"convnet_tiny"} and results[0]["model"] == "convnet_small"
    # alpha: auto was calibrated for the feature losses, and only there
    assert set(results[2]["alphas"]) == {"mgd.stage3"} and set(results[3]["alphas"]) == {"ct.stage3"}
    assert not results[1]["alphas"]
    # The exported teacher is the teacher alone, strict-loadable into a fresh convnet_small.
    from fastkd.models import build
    state = torch.load(out / "teacher.pt", weights_only=True)
    build("convnet_small", 10, in_channels=3).load_state_dict(state, strict=True)
    # The baseline never saw a teacher: no teacher line in its metrics.
    rows = [json.loads(line) for line in (out / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["kind"] == "teacher" for r in rows)
    md = (out / "results.md").read_text()
    assert "| mgd_kd | convnet_tiny |" in md and "machine:" in md

    # --only reruns one student and reads the other runs back from their directories.
    assert demo.main(args(tiny_fashion, out, "train.max_steps=2", "--only", "ct")) == 0
    after = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in after] == [r["name"] for r in results]
    for b, a in zip(results, after):
        assert a["steps"] == (2 if a["name"] == "ct" else 3)
        if a["name"] != "ct":
            assert a["top1"] == b["top1"]


def test_demo_student_without_teacher_is_a_clear_error(tiny_fashion, tmp_path, capsys):
    rc = demo.main(args(tiny_fashion, tmp_path / "none", "train.max_steps=1", "--only", "mgd"))
    assert rc == 2
    assert "teacher checkpoint not found" in capsys.readouterr().err


def test_demo_ffcv_path(tiny_fashion, tmp_path, capsys):
    """make demo's own path: .beton files (written once, then found), FFCV loaders; the teacher alone."""
    from fastkd.data.writers import ArraySource, write_beton

    data = tmp_path / "beton"
    data.mkdir()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = fashion_mnist.load(split, str(tiny_fashion))
        write_beton(ArraySource(images, labels, name=split, classes=fashion_mnist.CLASSES),
                    str(data / f"{split}.beton"), write_mode="raw", num_workers=1, progress=False)
    rc = demo.main(["--device", "cpu", "--data-dir", str(data), "--out", str(tmp_path / "runs"),
                    "train.max_steps=2", "train.batch_size=32", "train.progress=false", "--only", "teacher"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f".beton files present in {data}" in out and "| teacher | convnet_small |" in out
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [r["name"] for r in results] == ["teacher"] and results[0]["val_images"] == 160
