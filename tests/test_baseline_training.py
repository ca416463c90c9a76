"""Training without a teacher (``teacher: null``): the teacher itself and the no-distillation baselines run
the same loop, checkpoints and export as a distilled student, with no teacher forward, eval or loading."""
import json
import os

import pytest
import torch

from fastkd.config import ConfigError, load_config
from fastkd.engine.export import export_student
from tests.test_engine_nets import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tests", "tiny.yaml")
NO_TEACHER = ["teacher=null", "distill.pairs=[]", "distill.kd=null"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_environ")]


def test_train_without_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from fastkd.distill import distiller as distiller_mod
    from fastkd.engine import trainer

    forwards = []
    original = distiller_mod.Distiller.teacher_forward
    monkeypatch.setattr(distiller_mod.Distiller, "teacher_forward",
                        lambda self, images: forwards.append(self.teacher) or original(self, images))
    cfg = load_config(TINY, NO_TEACHER + [f"run_dir={tmp_path}", "train.epochs=1"])
    result = trainer.train(cfg)
    assert 0.0 <= result["val/top1"] <= 100.0
    assert forwards and all(t is None for t in forwards)  # the loop asks, nothing runs
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    kinds = {r["kind"] for r in rows}
    assert "teacher" not in kinds and "calibration" not in kinds and {"train", "eval"} <= kinds
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert set(k for k in train_rows[0] if k.startswith("loss/")) == {"loss/ce", "loss/total"}
    # Same checkpoints and export as a distilled run: the student alone, strict-loadable.
    state = export_student(str(tmp_path), str(tmp_path / "student.pt"))
    tiny(width=8).load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True), strict=True)
    assert state and not any(k.startswith(("losses.", "kd.")) for k in state)


def test_distillation_without_teacher_is_a_clear_error():
    with pytest.raises(ConfigError, match="need a teacher"):
        load_config(TINY, ["teacher=null"])
    with pytest.raises(ConfigError, match="need a teacher"):
        load_config(TINY, ["teacher=null", "distill.pairs=[]"])  # logit KD still asks for one
