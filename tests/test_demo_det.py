"""The detection demo end to end, shrunk: a dozen real scenes, small canvases, a few steps per run.

Same driver, same configs as ``python -m fastkd.demos.detection``; only the sizes are overridden."""
import json
import os

import pytest
import torch

pytest.importorskip("torchvision.ops", reason="torchvision does not import here")
pytest.importorskip("matplotlib", reason="the demo draws its picture with matplotlib")

from fastkd.demos import detection as demo_det  # noqa: E402
from fastkd.config import load_config  # noqa: E402
from fastkd.data.sources import fashion_mnist  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_environ")]


@pytest.fixture(scope="module")
def fashion_available():
    try:
        fashion_mnist.locate(download_ok=False)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed ({exc}); `make sysdeps` installs it")


@pytest.mark.parametrize("name", ("teacher",) + demo_det.STUDENTS)
def test_configs_validate(name):
    cfg = load_config(os.path.join(demo_det.config_dir(), f"{name}.yaml"))
    assert cfg.task == "detection" and cfg.data.val_path
    if name in ("teacher", "baseline"):
        assert cfg.teacher is None and not cfg.distill.pairs
    else:  # one module per FPN level, the teacher the demo exports
        assert [p.student for p in cfg.distill.pairs] == [f"fpn.p{i}" for i in range(3, 8)]
        assert {p.loss for p in cfg.distill.pairs} == {name}
        assert cfg.teacher.checkpoint == "runs/demo_det/teacher.pt"


def test_demo_det_end_to_end(fashion_available, tmp_path, capsys):
    out, data = tmp_path / "runs", tmp_path / "scenes"
    # The PyTorch loader over the .beton files, as the demo's configs (FFCV compiles its pipelines per loader).
    rc = demo_det.main(["--device", "cpu", "--data-dir", str(data), "--out", str(out), "--train-scenes", "8",
                        "--val-scenes", "4", "--pictures", "2", "data.source=torch", "data.num_workers=0",
                        "data.kwargs.min_size=64", "data.kwargs.max_size=96", "train.batch_size=2",
                        "train.max_steps=2", "train.log_every=1", "train.progress=false", "--seeds", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["teacher"] + 2 * ["baseline", "mgd", "ct"]
    assert [r["seed"] - results[0]["seed"] for r in results] == [0] + 3 * [0] + 3 * [1]
    for r in results:
        assert 0.0 <= r["AP"] <= r["AP50"] <= 1.0 or r["AP"] == r["AP50"] == -1.0
        assert r["steps"] == 2 and r["images_per_s"] > 0 and r["wall_s"] > 0
    assert results[0]["model"] == "retinanet_resnet34_fpn_v2"
    assert {r["model"] for r in results[1:]} == {"retinanet_resnet18_fpn_v2"}
    # alpha: auto calibrated one module per FPN level, for the feature losses only
    assert set(results[2]["alphas"]) == {f"mgd.fpn.p{i}" for i in range(3, 8)}
    assert set(results[3]["alphas"]) == {f"ct.fpn.p{i}" for i in range(3, 8)}
    assert not results[1]["alphas"]
    table = (out / "results.md").read_text()
    assert "| mgd | retinanet_resnet18_fpn_v2 (32) |" in table and "load average" in table and table in printed
    assert (out / "boxes.png").stat().st_size > 5000
    # two run directories per student (OUT/<run>, OUT/<run>_seed1), another seed another run
    for name in demo_det.STUDENTS:
        assert [r["run_dir"] for r in results if r["name"] == name] == [str(out / name), str(out / f"{name}_seed1")]
    assert _losses(out / "mgd") != _losses(out / "mgd_seed1")
    # box AP x100: mean and min-max over the seeds; the verdict line; compare.png
    base = [100 * r["AP"] for r in results if r["name"] == "baseline"]
    row = next(line for line in table.splitlines() if line.startswith("| baseline |"))
    seeds = f"{results[1]['seed']},{results[4]['seed']}"
    assert f"| {seeds} | {sum(base) / 2:.2f} | {min(base):.2f}-{max(base):.2f} |" in row
    assert "every method above the baseline by more than the seed spread: " in table
    assert "mean over 2 seeds" in table and str(out / "compare.png") in table
    assert (out / "compare.png").stat().st_size > 10000
    # the exported teacher is a whole detector; its backbone + FPN load strictly into the teacher's features
    from fastkd.tasks.detection.models import build_detector

    state = torch.load(out / "teacher.pt", weights_only=True)
    feats = build_detector("retinanet_resnet34_fpn_v2", num_classes=11, fpn_channels=64,
                           anchor_sizes=[16, 32, 64, 128, 256], frozen_bn=False, features_only=True)
    feats.load_state_dict({k: v for k, v in state.items() if k.startswith("backbone.")}, strict=True)
    # --only a student: the others come from their run directories, the data is not written again
    rc = demo_det.main(["--device", "cpu", "--data-dir", str(data), "--out", str(out), "--only", "baseline",
                        "--train-scenes", "8", "--val-scenes", "4", "--pictures", "2", "data.source=torch",
                        "data.num_workers=0", "data.kwargs.min_size=64", "data.kwargs.max_size=96",
                        "train.batch_size=2", "train.max_steps=1", "train.progress=false"])
    assert rc == 0
    assert f"fashion-scenes .beton files present in {data}" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in again] == ["teacher", "baseline", "mgd", "ct"] and again[1]["steps"] == 1
    assert "seed spread" not in (out / "results.md").read_text()  # one seed: no verdict


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows if r["kind"] == "train"]


def test_scenes_written_again_only_when_their_options_change(fashion_available, tmp_path):
    def prepare(*extra):
        return demo_det.prepare_data(demo_det.parse_args(["--data-dir", str(tmp_path), "--train-scenes", "3",
                                                          "--val-scenes", "2", *extra]))

    assert prepare().startswith("wrote 3 + 2 scenes (scale 0.5, garments 48-96 px")
    assert json.loads((tmp_path / demo_det.SCENES_STAMP).read_text())["garment_sizes"] == [48, 96]
    assert prepare().startswith("fashion-scenes .beton files present")
    assert prepare("--garment-sizes", "24", "96").startswith("wrote 3 + 2 scenes (scale 0.5, garments 24-96 px")
    (tmp_path / demo_det.SCENES_STAMP).unlink()  # .beton files of unknown options (an older demo): written again
    assert prepare("--garment-sizes", "24", "96").startswith("wrote")


def test_bad_override_exits_2(tmp_path, capsys):
    rc = demo_det.main(["--device", "cpu", "--out", str(tmp_path), "train.no_such_key=1"])
    assert rc == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()
    with pytest.raises(SystemExit) as exc:
        demo_det.parse_args(["--threads", "0"])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err
