"""The Fashion-MNIST demo end to end, shrunk: a few hundred real images, a few steps per run; the same
command twice prints the same accuracies.

Same driver, same configs as ``make demo``; only the sizes are overridden.
"""
import json
import os

import numpy as np
import pytest
import torch

from fastkd.demos import classification as demo
from fastkd.data.sources import fashion_mnist
from fastkd.data.sources.idx import write_idx

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


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_configs_validate():
    """What `make demo` runs: every config loads; students train three epochs, evaluated along the way."""
    ns = demo.parse_args(["--seeds", "3"])
    for k in range(3):
        for name in ("teacher",) * (k == 0) + demo.STUDENTS:  # one teacher for every seed of the students
            cfg = demo.run_config(name, ns, "runs/demo/teacher.pt", k)
            assert cfg.data.source == "ffcv" and cfg.run_dir == demo.run_dir(ns, name, k)
            if name == "teacher":
                assert cfg.teacher is None and cfg.seed == 0 and cfg.student.name == "convnet_small"
                continue
            assert cfg.seed == k and cfg.student.name == "convnet_tiny"
            assert cfg.train.max_steps is None and cfg.train.epochs == 3 and cfg.train.eval_every_steps > 0
            assert (cfg.teacher is None) == (name == "baseline")
    with pytest.raises(SystemExit):
        demo.parse_args(["--seeds", "0"])


def test_table_and_verdict_text():
    """The table and the verdict line, character for character, of two seeds of results (what the README shows)."""
    def row(name, k, top1, model="convnet_tiny"):
        return {"name": name, "model": model, "seed": k, "top1": top1, "images": 960, "images_per_s": 100.0 + 3 * k,
                "wall_s": 10.0 + k, "run_dir": f"runs/demo/{name}" + (f"_seed{k}" if k else "")}

    results = [row("teacher", 0, 90.82, "convnet_small")] + [
        row(n, k, t) for k, values in enumerate([(88.0, 89.5, 88.9, 88.95), (88.3, 89.2, 88.1, 89.0)])
        for n, t in zip(demo.STUDENTS, values)]
    assert demo.table(results) == "\n".join([
        "| run | model | seeds | top-1 % | min-max | vs baseline | train images | images/s | wall s | run dir |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| teacher | convnet_small | 0 | 90.82 |  |  | 960 | 100 | 10 | runs/demo/teacher |",
        "| baseline | convnet_tiny | 0,1 | 88.15 | 88.00-88.30 |  | 960 | 102 | 21 | runs/demo/baseline (+1) |",
        "| mgd | convnet_tiny | 0,1 | 89.35 | 89.20-89.50 | +1.20 | 960 | 102 | 21 | runs/demo/mgd (+1) |",
        "| ct | convnet_tiny | 0,1 | 88.50 | 88.10-88.90 | +0.35 | 960 | 102 | 21 | runs/demo/ct (+1) |",
        "| mgd_kd | convnet_tiny | 0,1 | 88.97 | 88.95-89.00 | +0.82 | 960 | 102 | 21 | runs/demo/mgd_kd (+1) |"])
    assert demo.verdict(results) == (
        "every method above the baseline by more than the seed spread: NO (mgd +1.20 vs spread 0.30; ct +0.35 vs "
        "spread 0.80; mgd_kd +0.82 vs spread 0.30)")
    assert demo.verdict(results[:5]) == ""  # one seed: no verdict


def test_demo_end_to_end(tiny_fashion, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = demo.main(args(tiny_fashion, out, "train.max_steps=3", "train.log_every=1", "train.eval_every_steps=2",
                        "--seeds", "2"))
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["teacher"] + 2 * ["baseline", "mgd", "ct", "mgd_kd"]
    assert [r["seed"] for r in results] == [0] + 4 * [0] + 4 * [1]
    for r in results:
        assert 0.0 <= r["top1"] <= 100.0 and r["val_images"] == 160
        assert r["steps"] == 3 and r["images_per_s"] > 0 and r["wall_s"] > 0
        assert os.path.isfile(r["plot"]) and os.path.getsize(r["plot"]) > 1000
    assert results[5]["run_dir"] == str(out / "baseline_seed1") and str(out / "mgd") in printed
    assert {r["model"] for r in results[1:]} == {"convnet_tiny"} and results[0]["model"] == "convnet_small"
    # alpha: auto was calibrated for the feature losses, and only there
    assert set(results[2]["alphas"]) == {"mgd.stage2", "mgd.stage3"} and set(results[3]["alphas"]) == {"ct.stage3"}
    assert not results[1]["alphas"]
    # Evaluated along the way (train.eval_every_steps) and at the end; one picture of all students.
    assert [r["step"] for r in _metrics(out / "ct_seed1") if r["kind"] == "eval"] == [2, 3]
    assert (out / "compare.png").stat().st_size > 10000 and str(out / "compare.png") in printed
    # Mean and min-max over the two seeds; where the time went.
    base = [r["top1"] for r in results if r["name"] == "baseline"]
    row = next(line for line in printed.splitlines() if line.startswith("| baseline |"))
    assert f"| 0,1 | {sum(base) / 2:.2f} | {min(base):.2f}-{max(base):.2f} |" in row
    assert "where the time went" in printed and "mgd_kd (seed 1)" in printed
    # Another seed is another run (order, initialisation, augmentation, masks).
    assert [r["loss/ce"] for r in _metrics(out / "mgd") if r["kind"] == "train"] != \
        [r["loss/ce"] for r in _metrics(out / "mgd_seed1") if r["kind"] == "train"]
    # The exported teacher is the teacher alone, strict-loadable into a fresh convnet_small.
    from fastkd.models import build
    state = torch.load(out / "teacher.pt", weights_only=True)
    build("convnet_small", 10, in_channels=3).load_state_dict(state, strict=True)
    # The baseline never saw a teacher: no teacher line in its metrics.
    assert not any(r["kind"] == "teacher" for r in _metrics(out / "baseline"))
    md = (out / "results.md").read_text()
    assert "| mgd_kd | convnet_tiny |" in md and "machine:" in md

    # The same runs again (a new teacher, a distilled student): the same accuracies, alphas and losses.
    again_out = tmp_path / "again"
    assert demo.main(args(tiny_fashion, again_out, "train.max_steps=3", "train.log_every=1",
                          "train.eval_every_steps=2", "--only", "teacher", "mgd_kd")) == 0
    again = json.loads((again_out / "results.json").read_text())
    assert [(r["name"], r["seed"], r["top1"], r["alphas"]) for r in again] == \
        [(r["name"], r["seed"], r["top1"], r["alphas"]) for r in (results[0], results[4])]
    assert [r["loss/total"] for r in _metrics(again_out / "mgd_kd") if r["kind"] == "train"] == \
        [r["loss/total"] for r in _metrics(out / "mgd_kd") if r["kind"] == "train"]

    # --only reruns one student and reads the other runs back from their directories.
    assert demo.main(args(tiny_fashion, out, "train.max_steps=2", "--only", "ct")) == 0
    after = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in after] == [r["name"] for r in results[:5]]
    for b, a in zip(results, after):
        assert a["steps"] == (2 if a["name"] == "ct" else 3)
        if a["name"] != "ct":
            assert a["top1"] == b["top1"]

    # An unfinished earlier run (interrupted; or running in another process) is left out of the table with a
    # note: the demo still trains what it was asked to and prints the rest.
    metrics = out / "mgd_kd" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["kind"] != "eval"))
    assert demo.main(args(tiny_fashion, out, "train.max_steps=2", "--only", "ct")) == 0
    assert "(not in the table:" in capsys.readouterr().out
    assert "mgd_kd" not in [r["name"] for r in json.loads((out / "results.json").read_text())]


def test_demo_student_without_teacher_is_a_clear_error(tiny_fashion, tmp_path, capsys):
    rc = demo.main(args(tiny_fashion, tmp_path / "none", "train.max_steps=1", "--only", "mgd"))
    assert rc == 2
    assert "teacher checkpoint not found" in capsys.readouterr().err


def test_demo_ffcv_path(tiny_fashion, tmp_path, capsys):
    """make demo's own path: .beton files (written once, then found), FFCV loaders; the teacher alone."""
    from fastkd.data.classification.writers import ArraySource, write_beton

    data = tmp_path / "beton"
    data.mkdir()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = fashion_mnist.load(split, str(tiny_fashion))
        write_beton(ArraySource(images, labels, name=split, classes=fashion_mnist.CLASSES),
                    str(data / f"{split}.beton"), write_mode="raw", num_workers=1, progress=False)
    common = ["--device", "cpu", "--data-dir", str(data), "--out", str(tmp_path / "runs"), "train.max_steps=2",
              "train.batch_size=32", "train.progress=false", "train.log_every=1"]
    assert demo.main(common + ["--only", "teacher", "mgd"]) == 0
    out = capsys.readouterr().out
    assert f".beton files present in {data}" in out and "| teacher | convnet_small |" in out
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [r["name"] for r in results] == ["teacher", "mgd"] and results[0]["val_images"] == 160
    # FFCV's augmentation is seeded: the same student again draws the same crops, flips, alpha, losses.
    first = _metrics(tmp_path / "runs" / "mgd")
    assert demo.main(common + ["--only", "mgd"]) == 0
    again = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert again[1]["alphas"] == results[1]["alphas"] and again[1]["top1"] == results[1]["top1"]
    assert [r.get("loss/total") for r in _metrics(tmp_path / "runs" / "mgd") if r["kind"] == "train"] == \
        [r.get("loss/total") for r in first if r["kind"] == "train"]


def test_demo_nonfinite_loss_is_one_line(tiny_fashion, tmp_path, capsys):
    """A run whose loss blows up ends the demo with the trainer's message and exit status 3, no traceback."""
    from fastkd.demos.common import run

    rc = run(lambda: demo.main(args(tiny_fashion, tmp_path / "nan", "train.max_steps=4", "optim.lr=3e38",
                                    "--only", "teacher")))
    err = capsys.readouterr().err
    assert rc == 3 and "fastkd demo: error: non-finite loss at step" in err and "Traceback" not in err
