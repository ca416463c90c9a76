"""Distiller: pair shape check, strict teacher loading, teacher kept out of params, alpha: auto."""
import pytest
import torch

from fastkd.config import ConfigError, DistillConfig, KDConfig, ModelConfig, PairConfig
from fastkd.distill import Distiller, build_losses, check_pairs
from fastkd.models.loading import load_teacher
from fastkd.tasks.classification import ClassificationTask

from tests.test_engine_nets import tiny

NET = "tests.test_engine_nets:tiny"


def _feats(width, n=4, size=8):
    return tiny(width=width)(torch.randn(n, 3, size, size), features=True)[1]


def test_unpairable_shapes_name_layers_and_shapes():
    pairs = [PairConfig(student="layer2", teacher="layer1", loss="mgd"),
             PairConfig(student="layer9", teacher="layer1", loss="ct")]
    with pytest.raises(ConfigError) as err:
        check_pairs(pairs, _feats(8), _feats(16))
    msg = str(err.value)
    assert "distill.pairs.0 (mgd: student 'layer2' <- teacher 'layer1')" in msg
    assert "student layer2 [4,16,4,4] (HxW 4x4) vs teacher layer1 [4,16,8,8] (HxW 8x8)" in msg
    assert "the student has no feature 'layer9'; available: layer1 [4,8,8,8], layer2 [4,16,4,4]" in msg


def test_teacher_strict_key_check(tmp_path):
    path = tmp_path / "teacher.pt"
    state = tiny(width=16).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(ConfigError) as err:
        load_teacher(ModelConfig(name=NET, num_classes=10, kwargs={"width": 16}, checkpoint=str(path)),
                     torch.device("cpu"))
    msg = str(err.value)
    assert "missing keys (1): fc.bias" in msg and "unexpected keys (1): extra.weight" in msg
    with pytest.raises(ConfigError, match="teacher checkpoint not found: /no/such.pt"):
        load_teacher(ModelConfig(name=NET, checkpoint="/no/such.pt"), torch.device("cpu"))
    torch.save(tiny(width=8).state_dict(), path)  # the wrong architecture
    with pytest.raises(ConfigError, match=r"shape mismatches \(\d+\): "):
        load_teacher(ModelConfig(name=NET, num_classes=10, kwargs={"width": 16}, checkpoint=str(path)),
                     torch.device("cpu"))


def _distiller(tmp_path, alpha="auto"):
    path = tmp_path / "t.pt"
    torch.save(tiny(width=16).state_dict(), path)
    teacher = load_teacher(ModelConfig(name=NET, num_classes=10, kwargs={"width": 16}, checkpoint=str(path)), torch.device("cpu"))
    student = tiny(width=8)
    cfg = DistillConfig(pairs=[PairConfig(student="layer2", teacher="layer2", loss="mgd", alpha=alpha, target=0.5),
                               PairConfig(student="layer1", teacher="layer1", loss="ct", alpha=1e-3)],
                        kd=KDConfig(alpha=0.5), backend="reference", label_smoothing=0.1)
    x = torch.randn(4, 3, 8, 8)
    specs = check_pairs(cfg.pairs, student(x, features=True)[1], teacher(x, features=True)[1])
    return Distiller(student, teacher, specs, build_losses(specs, seed=0, backend="reference"), cfg,
                     task=ClassificationTask(label_smoothing=cfg.label_smoothing)), cfg


def test_teacher_frozen_and_outside_params_and_state(tmp_path):
    d, _ = _distiller(tmp_path)
    assert not d.teacher.training and all(not p.requires_grad for p in d.teacher.parameters())
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in d.parameters()}
    assert all(k.startswith(("student.", "losses.", "kd.")) for k in d.state_dict())
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    t_logits, t_feats = d.teacher_forward(x)
    out = d((x, y), t_logits, t_feats, d.next_seeds(), 0, 1.0)
    assert set(out) == {"ce", "kd", "mgd.layer2", "ct.layer1", "total"}
    torch.testing.assert_close(out["total"], sum(v for k, v in out.items() if k != "total"))
    out["total"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())


def test_alpha_auto_calibration_and_checkpointed(tmp_path):
    d, cfg = _distiller(tmp_path)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    seeds = {k: d.losses[k].seeds.peek() for k in d.next_seeds()}  # next_seeds consumed one; peek the next
    chosen = d.calibrate(cfg, [((x, y), 0)], lambda t: t, torch.device("cpu"))
    assert set(chosen) == {"mgd.layer2"}
    t_logits, t_feats = d.teacher_forward(x)
    with torch.no_grad():
        out = d((x, y), t_logits, t_feats, seeds, 0, 1.0)
    # Same batch, same mask seed, train-mode BatchNorm: the term starts at exactly target x task loss.
    assert out["mgd.layer2"].item() == pytest.approx(0.5 * out["ce"].item(), rel=1e-4)
    d2, _ = _distiller(tmp_path, alpha="auto")
    d2.load_state_dict(d.state_dict())  # the chosen alpha travels in the module's extra state
    assert d2.losses["mgd_layer2"].alpha == pytest.approx(chosen["mgd.layer2"])


def test_unknown_model_name_is_a_config_error_with_a_suggestion():
    from fastkd.config import ConfigError, ModelConfig
    from fastkd.models.loading import build_model

    with pytest.raises(ConfigError, match=r"student.name: unknown model 'resnet19'; did you mean 'resnet18'"):
        build_model(ModelConfig(name="resnet19", num_classes=10), "student")
    with pytest.raises(ConfigError, match=r"teacher.name 'no_such_pkg:factory': cannot import factory"):
        build_model(ModelConfig(name="no_such_pkg:factory", num_classes=10), "teacher")


def test_explicit_alphas_of_the_config_win_after_a_resume():
    cfg = DistillConfig(pairs=[PairConfig(student="layer2", teacher="layer2", loss="mgd", alpha=1e-3),
                               PairConfig(student="layer1", teacher="layer1", loss="ct", alpha="auto")],
                        kd=KDConfig(alpha=0.5))
    s_feats = {"layer1": torch.randn(2, 4, 4, 4), "layer2": torch.randn(2, 8, 2, 2)}
    specs = check_pairs(cfg.pairs, s_feats, s_feats)
    distiller = Distiller(tiny(width=4), tiny(width=4), specs, build_losses(specs, seed=0, backend="reference"), cfg,
                          task=ClassificationTask(label_smoothing=cfg.label_smoothing))
    mgd, ct = (distiller.losses[sp.key] for sp in specs)
    mgd.alpha, ct.alpha, distiller.kd.alpha = 7.0, 3.0, 9.0  # as restored from a checkpoint
    changed = distiller.apply_explicit_alphas(cfg)
    assert sorted(name for name, _, _ in changed) == ["kd", "mgd.layer2"]
    assert (mgd.alpha, ct.alpha, distiller.kd.alpha) == (1e-3, 3.0, 0.5)  # the calibrated 'auto' one is kept
