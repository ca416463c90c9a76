"""Config: YAML + dotted overrides, unknown keys with suggestions, wrong types with field/value/type."""
import os

import pytest

from fastkd.config import ConfigError, load_config, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tests", "tiny.yaml")


def test_yaml_and_overrides():
    cfg = load_config(TINY, ["optim.lr=0.2", "distill.pairs.0.alpha=1e-5", "distill.pairs.1.loss=mgd",
                             "train.compile=true", "deepspeed.zero_stage=1"])
    assert cfg.optim.lr == 0.2
    assert cfg.distill.pairs[0].alpha == pytest.approx(1e-5)  # YAML 1.1 reads 1e-5 as a string: coerced
    assert cfg.distill.pairs[1].loss == "mgd"
    assert cfg.train.compile is True and cfg.deepspeed.zero_stage == 1
    assert cfg.distill.kd.temperature == 4.0
    assert load_config(TINY).distill.pairs[0].alpha == "auto"
    assert to_dict(cfg)["distill"]["pairs"][0]["student"] == "layer2"


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("distill.pairs.0.alpah=1", "unknown key 'distill.pairs.0.alpah'; did you mean 'distill.pairs.0.alpha'?"),
    ("trian.epochs=2", "unknown key 'trian'; did you mean 'train'?"),
])
def test_unknown_key_suggests_closest(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=abc", "optim.lr: got 'abc' (str), expected float"),
    ("distill.pairs.0.alpha=big", "distill.pairs.0.alpha: got 'big' (str), expected float or 'auto'"),
    ("distill.pairs.0.loss=kd", "distill.pairs.0.loss: got 'kd' (str), expected 'mgd' | 'ct'"),
    ("train.batch_size=[1]", "train.batch_size: got [1] (list), expected int"),
])
def test_wrong_type_names_field_value_and_type(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert expected in str(err.value)


def test_post_init_validation_and_override_errors():
    with pytest.raises(ConfigError, match="train: batch_size 16 is not divisible by grad_accum 3"):
        load_config(TINY, ["train.grad_accum=3"])
    with pytest.raises(ConfigError, match="ratio must be in"):
        load_config(TINY, ["distill.pairs.0.ratio=1.5"])
    with pytest.raises(ConfigError, match="is not an index of a list of 2"):
        load_config(TINY, ["distill.pairs.5.alpha=1"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(TINY, ["optim.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/cfg.yaml")
    with pytest.raises(ConfigError, match="teacher.checkpoint is required"):
        load_config(TINY, ["teacher.checkpoint=null"])


def test_teacher_optional_for_baselines():
    cfg = load_config(TINY, ["teacher=null", "distill.pairs=[]", "distill.kd=null"])
    assert cfg.teacher is None
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["teacher=null"])
    assert str(err.value).endswith("\n  distill.pairs / distill.kd need a teacher: set teacher (or remove them for a "
                                   "baseline)")


@pytest.mark.parametrize("override, name", [
    ("distill.pairs.0.alpha=inf", "distill.pairs.0: alpha"), ("distill.pairs.1.alpha=.nan", "distill.pairs.1: alpha"),
    ("distill.pairs.1.alpha=1e39", "distill.pairs.1: alpha"), ("distill.kd.alpha=-inf", "distill.kd: alpha"),
    ("distill.task_weight=inf", "distill: task_weight"), ("distill.pairs.0.target=inf", "distill.pairs.0: target"),
])
def test_loss_weights_are_finite_and_within_float32_at_load(override, name):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert f"{name} must be a finite number" in str(err.value)
    assert override.split("=")[1].lstrip(".") in str(err.value).replace("+", "")  # names the value given


def test_largest_accepted_loss_weight_is_float32_max():
    assert load_config(TINY, ["distill.pairs.1.alpha=1e38"]).distill.pairs[1].alpha == 1e38
    assert load_config(TINY, ["distill.pairs.1.alpha=3.4028234663852886e38"]).distill.pairs[1].alpha > 3.4e38
