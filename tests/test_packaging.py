"""The shipped configs (fastkd.resources): read from a source checkout, and from an installed wheel outside it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastkd import resources
from fastkd.cli import main as cli_main
from fastkd.config import ConfigError, load_config
from fastkd.engine.trainer import deepspeed_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_checkout_reads_its_own_configs(tmp_path, monkeypatch):
    assert resources.checkout_root() == REPO
    assert resources.configs_dir() == os.path.join(REPO, "configs")
    assert resources.config_path("demo/mgd.yaml") == os.path.join(REPO, "configs", "demo", "mgd.yaml")
    with pytest.raises(ConfigError, match=r"no config 'demo/nope.yaml' among fastkd's configs"):
        resources.config_path("demo/nope.yaml")
    monkeypatch.chdir(tmp_path)  # configs/... names the shipped file from any directory
    assert resources.locate("configs/deepspeed/zero2.json") == os.path.join(REPO, "configs", "deepspeed", "zero2.json")
    (tmp_path / "configs" / "deepspeed").mkdir(parents=True)
    (tmp_path / "configs" / "deepspeed" / "zero2.json").write_text("{}")  # one of the user's own wins
    assert resources.locate("configs/deepspeed/zero2.json") == "configs/deepspeed/zero2.json"
    assert resources.locate("configs/deepspeed/none.json") == "configs/deepspeed/none.json"  # caller: not found
    cfg = load_config(os.path.join(REPO, "configs", "tests", "tiny.yaml"), ["deepspeed.config=configs/deepspeed/no.json"])
    with pytest.raises(ConfigError, match="deepspeed.config: preset not found: configs/deepspeed/no.json"):
        deepspeed_config(cfg, micro=1, dtype=torch.float32)


INSTALLED = r"""
import os, sys, torch
import fastkd
import fastkd.cli
from fastkd import resources
from fastkd.config import load_config
from fastkd.engine.trainer import deepspeed_config
site = sys.argv[1]
assert fastkd.__file__.startswith(site), fastkd.__file__
assert resources.checkout_root() is None and resources.configs_dir().startswith(site)
cfg = load_config(resources.config_path("demo/mgd.yaml"))
assert cfg.deepspeed.config == "configs/deepspeed/zero0.json" and not os.path.exists(cfg.deepspeed.config)
ds = deepspeed_config(cfg, micro=cfg.train.batch_size, dtype=torch.float32)
assert ds["zero_optimization"]["stage"] == 0 and ds["train_batch_size"] == cfg.train.batch_size
sys.exit(fastkd.cli.main(["bench", "mgd"]))
"""


def test_an_installed_wheel_works_outside_the_checkout(tmp_path):
    """Build a wheel (no extension) from a copy of the checkout, install it into a folder of its own and run
    from elsewhere: a demo config and the DeepSpeed preset it names come from the package; ``fastkd bench``
    says that it needs a source checkout."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("fastkd", "configs"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(REPO, name), src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTKD_REQUIRE_EXT")}
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, env={**env, "FASTKD_SKIP_EXT": "1"}, cwd=src, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fastkd-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   env=env, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", INSTALLED, str(site)], env={**env, "PYTHONPATH": str(site)},
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "fastkd bench runs the benchmarks of a source checkout" in proc.stderr, proc.stderr


def test_bench_names_the_available_benchmarks(capsys):
    assert cli_main(["bench", "nope"]) == 2
    assert "no benchmark 'nope' (available: " in capsys.readouterr().err
