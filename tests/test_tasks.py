"""The task interface: a config picks its task; a task of one's own plugs into the same trainer.

``MeanSquaredTask`` below is a task the engine has never seen (regression of a per-image target with
two named loss terms and its own metric): the trainer, the distillation pairs, ``alpha: auto``,
checkpoints and logging must work with it unchanged.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastkd.config import ConfigError, load_config
from fastkd.tasks.classification.loaders import build_loaders
from fastkd.comm import all_reduce_sum
from fastkd.tasks import Task, build_task
from fastkd.tasks.classification import ClassificationTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tests", "tiny.yaml")


class MeanSquaredTask(Task):
    """Predict the first logit = the class index (a toy regression), with an extra L1 term."""
    name, headline = "mse", "rmse"

    def build_loaders(self, **kw):
        return build_loaders(self.cfg.data, **kw)

    def to_device(self, batch, device, dtype, channels_last):
        images, labels = batch
        return {"x": images.to(device, dtype), "y": labels.to(device, dtype)}

    def batch_size(self, batch):
        return int(batch["y"].shape[0])

    def loss_names(self, student):
        return ["mse", "l1"]

    def student_forward(self, student, batch):
        logits, feats = student(batch["x"], features=True)
        pred = logits[:, 0].float()
        return {"mse": F.mse_loss(pred, batch["y"]), "l1": 0.1 * F.l1_loss(pred, batch["y"])}, None, feats

    @torch.no_grad()
    def teacher_forward(self, teacher, batch, layers):
        _, feats = teacher(batch["x"], features=True)
        return None, feats if layers is None else {k: feats[k] for k in layers}

    @torch.no_grad()
    def evaluate(self, model, loader, device, dtype):
        sums = torch.zeros(2, dtype=torch.float64)
        for batch in loader:
            batch = self.to_device(batch, device, dtype, False)
            pred = model(batch["x"])[:, 0].double()
            sums += torch.stack([((pred - batch["y"].double()) ** 2).sum(), torch.tensor(float(pred.numel()))])
        sums = all_reduce_sum(sums)
        return {"rmse": float((sums[0] / sums[1]).sqrt()), "count": int(sums[1])}


def test_unknown_task_names_the_closest():
    with pytest.raises(ConfigError, match=r"task: unknown task 'detecton' \(did you mean 'detection'\?\)"):
        build_task(load_config(TINY, ["task=detecton"]))
    with pytest.raises(ConfigError, match="is not a fastkd.tasks.Task subclass"):
        build_task(load_config(TINY, ["task=tests.test_tasks:test_unknown_task_names_the_closest"]))
    assert isinstance(build_task(load_config(TINY)), ClassificationTask)  # the default


def test_logit_kd_refused_by_a_task_without_logits():
    cfg = load_config(TINY, ["task=tests.test_tasks:MeanSquaredTask"])
    with pytest.raises(ConfigError, match="logit KD is not defined for the mse task"):
        build_task(cfg).logit_loss(cfg.distill.kd, "reference")


@pytest.mark.slow
@pytest.mark.usefixtures("restore_environ")
def test_a_plugged_in_task_trains_with_pairs_checkpoints_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.chdir(tmp_path)
    from fastkd.engine import trainer
    from tests.test_engine_nets import tiny

    torch.manual_seed(0)
    torch.save(tiny(width=16).state_dict(), tmp_path / "teacher.pt")
    common = ["task=tests.test_tasks:MeanSquaredTask", "distill.kd=null", f"run_dir={tmp_path / 'run'}",
              "train.epochs=2"]
    result = trainer.train(load_config(TINY, common))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {k for k in train_rows[0] if k.startswith("loss/")} == {
        "loss/mse", "loss/l1", "loss/mgd.layer2", "loss/ct.layer1", "loss/total"}
    # alpha: auto measured against the task's own terms (mse + l1): the MGD term starts at 0.5x their sum.
    calib = [r for r in rows if r["kind"] == "calibration"]
    assert calib and calib[0]["alpha/mgd.layer2"] > 0
    first = train_rows[0]
    assert first["loss/mgd.layer2"] == pytest.approx(0.5 * (first["loss/mse"] + first["loss/l1"]), rel=1e-3)
    assert result["val/rmse"] > 0 and result["val/count"] == 37
    assert train_rows[-1]["loss/mse"] < train_rows[0]["loss/mse"]
    # The same run stopped after one epoch and resumed ends with the same model as the straight run,
    # in a process group made anew (``fastkd train`` tears its group down; DeepSpeed's cached groups must
    # not outlive it).
    from fastkd.engine.dist import teardown
    teardown()
    result2 = trainer.train(load_config(TINY, common[:-2] + [f"run_dir={tmp_path / 'run2'}", "train.epochs=2",
                                                         "train.session_steps=4"]))
    assert "val/rmse" not in result2
    resumed = trainer.train(load_config(TINY, common[:-2] + [f"run_dir={tmp_path / 'run2'}", "train.epochs=2"]))
    assert resumed["val/rmse"] == pytest.approx(result["val/rmse"], rel=1e-6)
