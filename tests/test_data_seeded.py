"""Seeded augmentation: the Philox draws, the crop recipe, and train batches that repeat exactly (FFCV and
PyTorch loaders, across loaders, thread counts and a mid-epoch resume)."""
import numpy as np
import pytest
import torch

from fastkd.data import seeded
from fastkd.data.classification.torch_loader import TorchLoader
from fastkd.data.seeded import crop_box, flips, philox4x32, seed_key
from fastkd.data.classification.writers import ArraySource
from fastkd.ops.mask import philox4x32 as mask_philox

# numba finalisers of FFCV's compiled pipelines raise KeyError at garbage collection (harmless).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_philox_known_answers_and_the_mask_generator():
    # Random123's known-answer vectors for Philox-4x32-10.
    assert philox4x32(0, 0, 0, 0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    m = 0xFFFFFFFF
    assert philox4x32(m, m, m, m, m, m) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox4x32(0xA4093822, 0x299F31D0, 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344) == \
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)
    # The same generator as the MGD masks (counter words 2 and 3 zero there).
    seed = 2**40 + 12345
    counters = [0, 7, 2**32 + 5, 2**45 + 99]
    k0, k1 = seed_key(seed)
    ref = mask_philox(seed, torch.tensor(counters, dtype=torch.int64)).tolist()
    assert ref == [philox4x32(k0, k1, c & m, c >> 32, 0, 0)[0] for c in counters]
    with pytest.raises(ValueError, match="seed"):
        seed_key(-1)


def test_draws_are_functions_of_seed_epoch_and_sample():
    k = seed_key(7)
    box = crop_box(40, 30, 0.08, 1.0, 3 / 4, 4 / 3, *k, 2, 11)
    assert box == crop_box(40, 30, 0.08, 1.0, 3 / 4, 4 / 3, *k, 2, 11)
    others = {crop_box(40, 30, 0.08, 1.0, 3 / 4, 4 / 3, *kk, e, i)
              for kk, e, i in ((seed_key(8), 2, 11), (k, 3, 11), (k, 2, 12))}
    assert box not in others
    # The recipe's statistics: area fraction ~ U(scale) where the window fits, flips at the given rate.
    fractions, flipped = [], []
    for index in range(4000):
        top, left, h, w = crop_box(100, 100, 0.25, 0.5, 1.0, 1.0, *k, 0, index)
        assert 0 <= top and 0 <= left and top + h <= 100 and left + w <= 100 and h == w
        fractions.append(h * w / 1e4)
        flipped.append(flips(*k, 0, index, 0.3))
    assert 0.24 <= min(fractions) and max(fractions) <= 0.51 and abs(np.mean(fractions) - 0.375) < 0.01
    assert abs(np.mean(flipped) - 0.3) < 0.03
    # No window fits (aspect far outside the range): the centre crop clamped to the range.
    assert crop_box(10, 100, 0.9, 1.0, 3 / 4, 4 / 3, *k, 0, 0) == (0, 43, 10, 13)


def test_numba_compiles_the_same_draws():
    numba = pytest.importorskip("numba")
    jit_crop = numba.njit(lambda *a: seeded.crop_box(*a))
    jit_flip = numba.njit(lambda *a: seeded.flips(*a))
    rng = np.random.default_rng(0)
    for n in range(300):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        k = seed_key(int(rng.integers(0, 2**63)))
        epoch, index = int(rng.integers(0, 1000)), int(rng.integers(0, 2**40))
        scale, ratio = (float(rng.uniform(0.01, 0.9)), 1.0), ((3 / 4, 4 / 3) if n % 2 else (0.2, 5.0))
        args = (h, w, *scale, *ratio, *k, epoch, index)
        assert tuple(jit_crop(*args)) == crop_box(*args), args
        assert jit_flip(*k, epoch, index, 0.5) == flips(*k, epoch, index, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Loaders: 30 random 12x10 images (label = index) cropped to 8x8.

N = 30
COMMON = dict(batch_size=4, image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), scale=(0.3, 1.0))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (N, 12, 10, 3), dtype=np.uint8)


def _epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _by_sample(batches):
    return {int(i): x[k] for x, y in batches for k, i in enumerate(y)}


def test_torch_loader_draws_per_sample(images):
    a = TorchLoader(ArraySource(images, np.arange(N)), train=True, num_workers=0, seed=7, **COMMON)
    b = TorchLoader(ArraySource(images, np.arange(N)), train=True, num_workers=2, seed=7, **COMMON)
    c = TorchLoader(ArraySource(images, np.arange(N)), train=True, num_workers=0, seed=8, **COMMON)
    e0, e1 = _epoch(a), _epoch(a)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(e0, _epoch(b, 0)))
    b.load_state_dict({"epoch": 1, "batch": 3})
    assert all(torch.equal(p[0], q[0]) for p, q in zip(e1[3:], _epoch(b))) and len(e1) == 7
    s0, s1, s8 = _by_sample(e0), _by_sample(e1), _by_sample(_epoch(c))
    common = set(s0) & set(s1) & set(s8)
    assert sum(not torch.equal(s0[i], s1[i]) for i in common) >= 0.8 * len(common)  # another epoch
    assert sum(not torch.equal(s0[i], s8[i]) for i in common) >= 0.8 * len(common)  # another seed


@pytest.mark.slow
def test_ffcv_batches_repeat_across_loaders_threads_and_resume(images, tmp_path):
    """Three FFCV loaders (each JIT-compiles its pipeline: seconds): same seed -> the same pixels on 2
    threads and on 1, after a mid-epoch resume, and as the PyTorch loader; another seed -> other crops."""
    pytest.importorskip("ffcv")
    from fastkd.data.classification.build import make_loader
    from fastkd.data.classification.writers import write_beton

    write_beton(ArraySource(images, np.arange(N)), str(tmp_path / "train.beton"), write_mode="raw",
                num_workers=1, progress=False)
    ffcv = dict(source="ffcv", path=str(tmp_path), **COMMON)
    a = make_loader("train", seed=7, num_workers=2, **ffcv)
    e0, e1 = _epoch(a), _epoch(a)
    b = make_loader("train", seed=7, num_workers=1, **ffcv)
    b.load_state_dict({"epoch": 1, "batch": 2})  # a fresh loader resumed mid-epoch
    rest = _epoch(b)
    assert len(rest) == len(e1) - 2 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
                                            for p, q in zip(e1[2:], rest))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(e0, _epoch(b, 0)))
    # The PyTorch loader crops and flips every sample the same way (float normalisation aside).
    t = TorchLoader(ArraySource(images, np.arange(N)), train=True, num_workers=0, seed=7, **COMMON)
    for mine, theirs in ((e0, _epoch(t)), (e1, _epoch(t))):
        for (x, y), (xt, yt) in zip(mine, theirs):
            assert torch.equal(y, yt)
            torch.testing.assert_close(x, xt, atol=1e-5, rtol=0)
    c = make_loader("train", seed=8, num_workers=2, **ffcv)
    s0, s1, s8 = _by_sample(e0), _by_sample(e1), _by_sample(_epoch(c))
    common = set(s0) & set(s1) & set(s8)
    assert sum(not torch.equal(s0[i], s1[i]) for i in common) >= 0.8 * len(common)
    assert sum(not torch.equal(s0[i], s8[i]) for i in common) >= 0.8 * len(common)
