import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. This must be set before
# any module that defines @triton.jit kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# ``backend="auto"`` takes the static order in tests (no timing trials, no cache file in the user's
# home); tests/test_dispatch_auto.py switches the measurement on with a temporary cache directory.
os.environ.setdefault("FASTKD_AUTO_TRIAL", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_environ():
    """For tests that run the engine in this process (a one-process group, kept alive for the next run),
    which writes RANK/WORLD_SIZE/MASTER_* and, for --device cpu, CUDA_VISIBLE_DEVICES: leave the
    environment as found."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
