"""`fastkd` CLI: user mistakes end with one clear message and a nonzero exit, without a traceback."""
import os
import subprocess
import sys

import pytest
import torch

from tests.test_engine_nets import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tests", "tiny.yaml")


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "fastkd.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.save(tiny(width=16).state_dict(), d / "teacher.pt")
    torch.save(tiny(width=4).state_dict(), d / "wrong_teacher.pt")
    return d


CASES = {
    "unknown key": (["optim.lrr=0.1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    "wrong type": (["train.epochs=two"], "train.epochs: got 'two' (str), expected int"),
    "missing teacher file": (["teacher.checkpoint=/no/such/teacher.pt"],
                             "teacher checkpoint not found: /no/such/teacher.pt"),
    "teacher keys mismatch": (["teacher.checkpoint={d}/wrong_teacher.pt"],
                              "teacher checkpoint {d}/wrong_teacher.pt does not match the teacher model"),
    "unpairable shapes": (["distill.pairs.0.teacher=layer1"],
                          "student layer2 [16,16,4,4] (HxW 4x4) vs teacher layer1 [16,16,8,8] (HxW 8x8)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_clear_message(case, teacher):
    overrides, expected = CASES[case]
    overrides = [o.format(d=teacher) for o in overrides]
    res = run_cli("train", TINY, f"teacher.checkpoint={teacher}/teacher.pt", f"run_dir={teacher}/run", *overrides,
                  cwd=teacher)
    assert res.returncode == 2, res.stderr[-3000:]
    assert expected.format(d=teacher) in res.stderr
    assert "Traceback" not in res.stderr
    assert "No CUDA runtime is found" not in res.stderr  # torch's note when DeepSpeed loads, on a CPU machine
    assert not os.path.isdir(teacher / "run" / "checkpoints")


def test_export_and_plot_errors(tmp_path):
    res = run_cli("export", str(tmp_path), "--out", str(tmp_path / "s.pt"), cwd=tmp_path)
    assert res.returncode == 2 and "no complete checkpoint in" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("plot", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and "no metrics.jsonl in" in res.stderr


def test_help_lists_subcommands(tmp_path):
    res = run_cli("--help", cwd=tmp_path)
    assert res.returncode == 0
    for sub in ("train", "eval", "export", "plot", "bench"):
        assert sub in res.stdout
    assert "top-1/top-5 of a student" not in res.stdout  # eval is not classification only
    res = run_cli("eval", "--help", cwd=tmp_path)
    assert res.returncode == 0
    for what in ("top-1/top-5", "COCO box AP", "mIoU", "IoU per class", "before or after the options"):
        assert what in " ".join(res.stdout.split()), what


def test_help_imports_no_torch(tmp_path):
    """``fastkd --help`` and ``fastkd data write --help`` build every parser (the data folders' writers
    included) without importing torch: the handlers import what they need when they run."""
    code = ("import sys\nfrom fastkd.cli import build_parser\np = build_parser()\n"
            "for argv in (['--help'], ['data', 'write', '--help']):\n"
            "    try:\n        p.parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for kind in ("imagefolder", "fashion-mnist", "cityscapes", "fashion-scenes", "coco"):
        assert kind in res.stdout, kind
    assert res.stdout.strip().endswith("no torch"), res.stdout


@pytest.mark.parametrize("words,short", [([], "cls"), (["det"], "det"), (["segmentation"], "seg")])
def test_demo_picks_the_demo_named_first(tmp_path, words, short):
    res = run_cli("demo", *words, "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"usage: fastkd demo {short} " in res.stdout


def test_eval_takes_overrides_after_its_options(teacher):
    """`fastkd eval CFG --teacher KEY=VALUE ...`: the overrides after the option are applied (the teacher file
    and a 5-image validation set), not refused as unrecognized arguments."""
    res = run_cli("eval", TINY, "--teacher", f"teacher.checkpoint={teacher}/teacher.pt", "data.val_size=5",
                  cwd=teacher)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{teacher}/teacher.pt: top1 " in res.stdout and " on 5 images" in res.stdout, res.stdout
    res = run_cli("eval", TINY, "data.val_size=5", "--teacher", "--bogus", cwd=teacher)
    assert res.returncode == 2 and "unrecognized arguments: --bogus" in res.stderr
