"""The MGD mask contract: Philox-4x32-10 bit-equal to triton.language.rand, and the mask's properties."""
import os

import pytest
import torch

from fastkd.ops.mask import mask_counters, mgd_keep_mask, philox4x32, philox_uniform

SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 + 7, 2**40 + 3, 2**63 - 5, 2**63 + 5, 2**64 - 1]
BASES = [0, 1000, 2**32 - 10]


def test_philox_known_answer():
    # Philox4x32-10 known-answer vector (Random123 kat_vectors): key=(0,0), counter=(0,0,0,0)
    # -> first word 0x6627e8d5. Our counter (0, 0) with seed 0 is exactly that input.
    assert philox4x32(0, torch.zeros(1, dtype=torch.int64)).item() == 0x6627E8D5
    # key=(0xffffffff, 0xffffffff), counter=(0xffffffff, 0xffffffff, 0, 0) is not a KAT input (c2, c3
    # are always 0 in tl.rand), so the second check is against Triton itself below.


@pytest.fixture(scope="module")
def triton_rand():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def rand_kernel(out, seed, base, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, tl.rand(seed, base + offs.to(tl.int64)), mask=offs < n)

    def run(seed, base, n, device):
        out = torch.empty(n, device=device)
        rand_kernel[(triton.cdiv(n, 128),)](out, seed, base, n, BLOCK=128)
        return out

    return run


@pytest.mark.parametrize("seed", SEEDS)
def test_bit_equal_to_triton_rand(triton_rand, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 257
    for base in BASES:
        got = triton_rand(seed, base, n, device).cpu()
        want = philox_uniform(seed, torch.arange(n, dtype=torch.int64) + base)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (seed, base)


def test_uniform_range_and_fraction():
    u = philox_uniform(7, torch.arange(200_000, dtype=torch.int64))
    assert u.dtype == torch.float32
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005
    for ratio in (0.15, 0.5, 0.65):
        frac = (u < ratio).float().mean().item()
        assert abs(frac - ratio) < 0.005, (ratio, frac)


def test_dropped_fraction_of_masks():
    for mode, shape in (("spatial", (64, 16, 32, 32)), ("channel", (256, 512, 7, 7))):
        m = mgd_keep_mask(mode, *shape, ratio=0.65, seed=3)
        assert abs((1 - m.mean().item()) - 0.65) < 0.01


def test_mask_shapes_and_sharing():
    n, c, h, w = 3, 5, 4, 6
    sp = mgd_keep_mask("spatial", n, c, h, w, ratio=0.5, seed=11)
    ch = mgd_keep_mask("channel", n, c, h, w, ratio=0.5, seed=11)
    assert sp.shape == (n, 1, h, w)  # one value per pixel, broadcast over (shared by) all channels
    assert ch.shape == (n, c, 1, 1)  # one value per channel, broadcast over all pixels
    x = torch.ones(n, c, h, w)
    masked = x * sp
    assert torch.equal(masked, masked[:, :1].expand_as(masked))
    masked = x * ch
    assert torch.equal(masked, masked[:, :, :1, :1].expand_as(masked))
    assert set(sp.unique().tolist()) == {0.0, 1.0}


def test_same_seed_same_mask_different_seed_different():
    a = mgd_keep_mask("spatial", 4, 8, 16, 16, ratio=0.5, seed=123)
    b = mgd_keep_mask("spatial", 4, 8, 16, 16, ratio=0.5, seed=123)
    c = mgd_keep_mask("spatial", 4, 8, 16, 16, ratio=0.5, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_counters_follow_the_global_sample_index():
    # a sample's mask does not depend on how the global batch is split across processes
    for mode in ("spatial", "channel"):
        whole = mgd_keep_mask(mode, 6, 5, 3, 4, ratio=0.5, seed=99)
        parts = [mgd_keep_mask(mode, 2, 5, 3, 4, ratio=0.5, seed=99, sample_offset=o) for o in (0, 2, 4)]
        assert torch.equal(whole, torch.cat(parts))
    ctr = mask_counters("spatial", 2, 5, 3, 4, sample_offset=10)
    assert ctr[1, 0, 2, 3].item() == 11 * 12 + 2 * 4 + 3
    ctr = mask_counters("channel", 2, 5, 3, 4, sample_offset=10)
    assert ctr[1, 4, 0, 0].item() == 11 * 5 + 4


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        mgd_keep_mask("spatial", 1, 1, 2, 2, ratio=0.5, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        mgd_keep_mask("spatial", 1, 1, 2, 2, ratio=0.5, seed=1.5)
    with pytest.raises(ValueError, match="mask"):
        mgd_keep_mask("pixel", 1, 1, 2, 2, ratio=0.5, seed=1)
