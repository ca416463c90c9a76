"""The feature-loss registry: a pair's loss picks its config class, its module, its seeding and its start-up
check; a loss of one's own (tests/plugin_loss.py) plugs in from outside the package, also from the CLI."""
import json
import os
import subprocess
import sys
from typing import Literal

import pytest
import torch

from fastkd.config import (ConfigError, CTPairConfig, DistillConfig, MGDPairConfig, PairConfig, config_class,
                           load_config, register_pair_config, to_dict)
from fastkd.distill import Distiller, build_losses, check_pairs
from fastkd.engine import resume
from fastkd.losses import CT, MGD, feature_loss
from fastkd.tasks.classification import ClassificationTask
from tests.test_engine_nets import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tests", "tiny.yaml")
PLUGIN = ["imports=[tests.plugin_loss]", "distill.kd=null",
          "distill.pairs=[{student: layer2, teacher: layer2, loss: l2proj, alpha: auto, target: 0.5}, "
          "{student: layer1, teacher: layer1, loss: dropl2, keep: 0.5, alpha: 0.01}]"]


def _error(*overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, list(overrides))
    return str(err.value)


def test_builtin_losses_are_registry_entries():
    mgd, ct = feature_loss("mgd"), feature_loss("ct")
    assert (mgd.config, mgd.seeded, ct.config, ct.seeded) == (MGDPairConfig, True, CTPairConfig, False)
    pair = PairConfig(student="layer1", teacher="layer1", loss="ct", hidden_channels=4)  # the base picks the class
    assert type(pair) is CTPairConfig and type(PairConfig(student="a", teacher="b")) is MGDPairConfig
    assert isinstance(mgd.build(8, 16, PairConfig(student="a", teacher="b", ratio=0.5), 1.0, 3, "reference"), MGD)
    assert isinstance(ct.build(8, 16, pair, 1.0, 3, "reference"), CT)
    with pytest.raises(ConfigError, match=r"unknown loss 'mdg' \(did you mean 'mgd'\?\); registered: mgd, ct"):
        feature_loss("mdg")
    with pytest.raises(ConfigError, match="unknown loss 'kd'; registered: mgd, ct"):
        PairConfig(student="a", teacher="b", loss="kd")


def test_each_loss_has_its_own_keys():
    cfg = load_config(TINY)
    assert [type(p) for p in cfg.distill.pairs] == [MGDPairConfig, CTPairConfig]
    assert list(to_dict(cfg)["distill"]["pairs"][1]) == ["student", "teacher", "loss", "alpha", "target",
                                                         "hidden_channels", "reduction"]
    assert ("unknown key 'distill.pairs.0.hidden_channels' (valid keys for loss 'mgd': student, teacher, loss, "
            "alpha, target, mask, ratio; hidden_channels is a key of loss 'ct')") in _error(
        "distill.pairs.0.hidden_channels=8")
    assert "unknown key 'distill.pairs.1.rato'; did you mean 'distill.pairs.1.ratio'?" not in _error(
        "distill.pairs.1.rato=0.5")  # ratio is MGD's: not suggested on a CT pair
    assert "distill.pairs.0.loss: got 'mdg' (str), expected 'mgd' | 'ct' (did you mean 'mgd'?)" in _error(
        "distill.pairs.0.loss=mdg")
    assert "distill.pairs.1.reduction: got 'sum' (str), expected 'sum_over_batch' | 'mean'" in _error(
        "distill.pairs.1.reduction=sum")
    assert "distill.pairs.0: ratio must be in [0, 1), got 1.5" in _error("distill.pairs.0.ratio=1.5")
    assert "distill.pairs.0: got 3 (int), expected a mapping (a feature pair)" in _error("distill.pairs.0=3")
    assert "distill.pairs.1.student: required key is missing (str)" in _error(
        "distill.pairs=[{student: layer1, teacher: layer1}, {teacher: layer1, loss: ct}]")
    assert "imports.0: cannot import 'no_such_module_xyz'" in _error("imports=[no_such_module_xyz]")


def test_config_loading_imports_neither_torch_nor_the_losses():
    code = ("import sys; from fastkd.config import load_config; load_config(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'fastkd.losses', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, TINY], env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registering_checks_the_config_class():
    class Undecorated(PairConfig):
        pass

    @config_class
    class NoName(PairConfig):
        pass

    @config_class
    class Taken(PairConfig):
        loss: Literal["mgd"] = "mgd"

    for cls, msg in ((Undecorated, "decorated with @fastkd.config.config_class"),
                     (NoName, r"must declare its loss name as `loss: Literal\[\"name\"\] = \"name\"`"),
                     (Taken, "loss 'mgd' is already registered by fastkd.config.MGDPairConfig")):
        with pytest.raises(TypeError, match=msg):
            register_pair_config(cls)
    assert feature_loss("mgd").config is MGDPairConfig and type(PairConfig(student="a", teacher="b")) is MGDPairConfig


def test_a_loss_of_ones_own_validates_builds_and_distils():
    cfg = load_config(TINY, PLUGIN)  # `imports` registers l2proj and dropl2 before the pairs are validated
    from tests.plugin_loss import DropL2, DropL2PairConfig, L2Proj, L2ProjPairConfig
    assert [type(p) for p in cfg.distill.pairs] == [L2ProjPairConfig, DropL2PairConfig]
    assert ("unknown key 'distill.pairs.0.keep' (valid keys for loss 'l2proj': student, teacher, loss, alpha, "
            "target; keep is a key of loss 'dropl2')") in _error(*PLUGIN, "distill.pairs.0.keep=0.5")
    assert "distill.pairs.1: keep must be in (0, 1], got 2.0" in _error(*PLUGIN, "distill.pairs.1.keep=2.0")

    torch.manual_seed(0)
    student, teacher = tiny(width=4), tiny(width=8).eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    specs = check_pairs(cfg.distill.pairs, student(x, features=True)[1], teacher(x, features=True)[1])
    losses = build_losses(specs, seed=0, backend="reference")
    assert [type(m) for m in losses.values()] == [L2Proj, DropL2] and list(losses) == ["l2proj_layer2", "dropl2_layer1"]
    d = Distiller(student, teacher, specs, losses, cfg.distill,
                  task=ClassificationTask(label_smoothing=cfg.distill.label_smoothing))
    seeds = d.next_seeds()  # only the seeded loss draws seeds
    assert list(seeds) == ["dropl2_layer1"] and losses["dropl2_layer1"].seeds.calls == 1
    t_logits, t_feats = d.teacher_forward((x, y))
    out = d((x, y), t_logits, t_feats, seeds, 0, 1.0)
    assert list(out) == ["ce", "l2proj.layer2", "dropl2.layer1", "total"]
    assert losses["dropl2_layer1"].seen == [seeds["dropl2_layer1"]]
    with torch.no_grad():
        expected = ((losses["l2proj_layer2"].proj(student(x, features=True)[1]["layer2"]) - t_feats["layer2"]) ** 2)
    assert out["l2proj.layer2"].item() == pytest.approx(float(expected.sum() / 4), rel=1e-5)  # alpha: auto -> 1.0
    out["total"].backward()
    assert all(m.proj.weight.grad.abs().sum() > 0 for m in losses.values())
    # the loss's own start-up check
    feats = {"layer1": torch.zeros(2, 4, 1, 1), "layer2": torch.zeros(2, 8, 1, 1)}
    with pytest.raises(ConfigError, match=r"distill.pairs.1 \(dropl2: student 'layer1' <- teacher 'layer1'\): "
                                          r"dropl2 needs \[N,C,H,W\] features of the same HxW, at least 2x2"):
        check_pairs(cfg.distill.pairs, feats, feats)
    assert DistillConfig(pairs=[{"student": "a", "teacher": "b", "loss": "dropl2"}]).pairs[0].keep == 0.5


def test_resume_reads_configs_written_with_one_flat_pair_class(tmp_path):
    """Configs written before each loss had its pair class held every loss's keys in every pair."""
    args = [f"teacher.checkpoint={tmp_path / 'teacher.pt'}"]
    saved = to_dict(load_config(TINY, args))
    del saved["imports"]
    for pair in saved["distill"]["pairs"]:
        for key, value in {"mask": "spatial", "ratio": 0.65, "hidden_channels": None,
                           "reduction": "sum_over_batch"}.items():
            pair.setdefault(key, value)
    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "step_00000004" / "config.json").write_text(json.dumps(saved))
    saved = resume.saved_config(str(tmp_path), "step_00000004")
    assert resume.review(saved, load_config(TINY, args), saved_world=1, world=1, where="x") == []
    assert resume.review(saved, load_config(TINY, [*args, "distill.pairs.0.ratio=0.6"]), saved_world=1, world=1,
                         where="x") == ["distill.pairs.0.ratio 0.5 -> 0.6: applied from the new config"]
    with pytest.raises(ConfigError, match="distill.pairs.1.loss 'ct' -> 'mgd'"):
        resume.review(saved, load_config(TINY, [*args, "distill.pairs.1.loss=mgd"]), saved_world=1, world=1,
                      where="x")


def _train(tmp_path, *overrides):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-m", "fastkd.cli", "train", TINY, "teacher.checkpoint=teacher.pt",
                          *PLUGIN, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in open(tmp_path / overrides[0].split("=")[1] / "metrics.jsonl")]


@pytest.mark.slow
def test_a_loss_of_ones_own_trains_from_the_cli_and_resumes_exactly(tmp_path):
    """``fastkd train`` with ``imports:``: calibration, the seeded loss outside the compiled region, checkpoints,
    and a resume that continues the seeded loss's stream exactly (a stopped-and-resumed run ends as a straight
    one), with no change to the engine or the Distiller."""
    torch.manual_seed(0)
    torch.save(tiny(width=16).state_dict(), tmp_path / "teacher.pt")
    straight = _train(tmp_path, "run_dir=straight", "train.max_steps=4")
    _train(tmp_path, "run_dir=stopped", "train.max_steps=4", "train.session_steps=2")
    resumed = _train(tmp_path, "run_dir=stopped", "train.max_steps=4")
    rows = [r for r in straight if r["kind"] == "train"]
    assert {k for k in rows[0] if k.startswith("loss/")} == {"loss/ce", "loss/l2proj.layer2", "loss/dropl2.layer1",
                                                            "loss/total"}
    calib = [r for r in straight if r["kind"] == "calibration"]
    assert calib and rows[0]["loss/l2proj.layer2"] == pytest.approx(0.5 * rows[0]["loss/ce"], rel=1e-3)
    last = [r for r in resumed if r["kind"] == "train"][-1]
    assert last["step"] == rows[-1]["step"] == 4
    assert {k: v for k, v in last.items() if k.startswith("loss/")} == \
        {k: v for k, v in rows[-1].items() if k.startswith("loss/")}
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["imports"] == ["tests.plugin_loss"] and saved["distill"]["pairs"][1]["keep"] == 0.5
