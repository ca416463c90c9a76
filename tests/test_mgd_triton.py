"""The fused Triton MGD loss against the PyTorch reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), which is slow: the grid below
is a handful of small odd shapes chosen so that together they cover both mask modes, align on and off,
contiguous and channels_last, several row tiles, channel counts that are not multiples of the tile, a
tile spanning several samples, a non-zero sample_offset and grad_output != 1. GPU tests at the issue's
shapes are marked ``gpu``.

Tolerances: fastkd.testing.KERNEL_TOLERANCES[("mgd_loss", dtype)] through assert_kernel_close:
    float32   elementwise, |fast - ref| <= atol * max|ref| + rtol * |ref|            atol 1e-4, rtol 1e-4
    bfloat16  max|fast - ref32| <= k * max|plain - ref32| + floor * max|ref32|   k 2, floor 2e-3
    float16   same rule                                                          k 2, floor 2.5e-4
where ref is the reference in the same dtype (float32), ref32 the float32 reference on the same rounded
inputs and plain the reference computed in the low dtype. The mask is compared bit for bit. float32 runs
with TF32 off on both sides (a GPU's convolutions would otherwise use TF32).
"""
from __future__ import annotations

import pytest
import torch

from fastkd.ops import explain, mgd_loss
from fastkd.ops.mask import mgd_keep_mask
from fastkd.testing import assert_kernel_close

GRAD_NAMES = ("student", "gen_w1", "gen_b1", "gen_w2", "gen_b2", "align_w", "align_b")
GRAD_OUT = 1.7  # dL_total/dloss != 1 checks that the backward scales every gradient


# The small-shape grid runs wherever the kernels run: compiled on a GPU, interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 on both sides in IEEE precision (PyTorch's GPU convolutions, and so the fused path's
    float32 dots, otherwise use TF32)."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev


def make_inputs(n, cs, ct, h, w, dtype=torch.float32, channels_last=False, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(device=device, dtype=dtype)  # noqa: E731
    student, teacher = r(n, cs, h, w), r(n, ct, h, w)
    if channels_last:
        student = student.contiguous(memory_format=torch.channels_last)
        teacher = teacher.contiguous(memory_format=torch.channels_last)
    params = {"gen_w1": r(ct, ct, 3, 3, s=(9 * ct) ** -0.5), "gen_b1": r(ct, s=0.1),
              "gen_w2": r(ct, ct, 3, 3, s=(9 * ct) ** -0.5), "gen_b2": r(ct, s=0.1)}
    if cs != ct:
        params.update(align_w=r(ct, cs, 1, 1, s=cs ** -0.5), align_b=r(ct, s=0.1))
    return student, teacher, params


def run(student, teacher, params, *, backend, dtype=None, grad_out=GRAD_OUT, **kw):
    """Loss and gradients of every differentiable input (as fresh leaves, optionally cast to dtype)."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    leaves = {"student": cast(student).detach().requires_grad_()}
    leaves.update({k: cast(v).detach().requires_grad_() for k, v in params.items()})
    p = {k: leaves[k] for k in params}
    loss = mgd_loss(leaves["student"], cast(teacher), p["gen_w1"], p["gen_b1"], p["gen_w2"], p["gen_b2"],
                    align_w=p.get("align_w"), align_b=p.get("align_b"), backend=backend, **kw)
    (loss * grad_out).backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


# (n, cs, ct, h, w, mask, channels_last, sample_offset)
FP32_CASES = [
    (2, 16, 16, 7, 7, "spatial", False, 0),
    (2, 24, 16, 5, 9, "channel", True, 0),
    (2, 16, 24, 5, 9, "spatial", True, 5),
    (2, 24, 24, 7, 7, "channel", False, 3),
]


@pytest.mark.parametrize("n,cs,ct,h,w,mask,channels_last,offset", FP32_CASES)
def test_float32_matches_reference(n, cs, ct, h, w, mask, channels_last, offset):
    student, teacher, params = make_inputs(n, cs, ct, h, w, channels_last=channels_last)
    kw = dict(mask=mask, ratio=0.5, alpha=0.3, seed=1234, sample_offset=offset)
    loss, grads = run(student, teacher, params, backend="triton", **kw)
    ref_loss, ref_grads = run(student, teacher, params, backend="reference", **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_kernel_close("mgd_loss", torch.float32, loss, ref_loss, name="loss")
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].shape == ref_grads[name].shape, name
        assert_kernel_close("mgd_loss", torch.float32, grads[name], ref_grads[name], name=f"d{name}")
    if channels_last:  # the student's gradient keeps its layout
        assert grads["student"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n,cs,ct,h,w,mask,frozen,seed", [
    (2, 24, 16, 5, 5, "channel", ("student", "gen_w2"), 2**64 - 1),  # one pixel split: wgrad writes dW itself
    (3, 16, 16, 4, 1, "spatial", ("gen_b1",), 2**63),                 # W = 1 (degenerate strides)
])
def test_partial_gradients_degenerate_shapes_and_large_seeds(n, cs, ct, h, w, mask, frozen, seed):
    student, teacher, params = make_inputs(n, cs, ct, h, w, channels_last=True)
    kw = dict(mask=mask, ratio=0.4, alpha=0.3, seed=seed, sample_offset=2**33)
    out = {}
    for backend in ("triton", "reference"):
        leaves = {"student": student.detach().clone(), **{k: v.detach().clone() for k, v in params.items()}}
        for k, v in leaves.items():
            v.requires_grad_(k not in frozen)
        loss = mgd_loss(leaves["student"], teacher, leaves["gen_w1"], leaves["gen_b1"], leaves["gen_w2"],
                        leaves["gen_b2"], align_w=leaves.get("align_w"), align_b=leaves.get("align_b"),
                        backend=backend, **kw)
        (loss * GRAD_OUT).backward()
        out[backend] = (loss.detach(), {k: v.grad for k, v in leaves.items()})
    assert_kernel_close("mgd_loss", torch.float32, out["triton"][0], out["reference"][0], name="loss")
    for name, g in out["triton"][1].items():
        if name in frozen:
            assert g is None, name
        else:
            assert_kernel_close("mgd_loss", torch.float32, g, out["reference"][1][name], name=f"d{name}")


# (dtype, n, cs, ct, h, w, mask, channels_last)
LOWP_CASES = [
    (torch.bfloat16, 2, 24, 16, 7, 7, "spatial", True),
    (torch.float16, 2, 16, 16, 5, 9, "channel", False),
]


@pytest.mark.parametrize("dtype,n,cs,ct,h,w,mask,channels_last", LOWP_CASES)
def test_low_precision_error_within_plain_pytorch(dtype, n, cs, ct, h, w, mask, channels_last):
    student, teacher, params = make_inputs(n, cs, ct, h, w, channels_last=channels_last)
    # the float32 truth runs on the same (rounded) low-precision values
    student, teacher = student.to(dtype), teacher.to(dtype)
    params = {k: v.to(dtype) for k, v in params.items()}
    kw = dict(mask=mask, ratio=0.65, alpha=0.5, seed=99, sample_offset=1)
    fast_loss, fast = run(student, teacher, params, backend="triton", **kw)
    plain_loss, plain = run(student, teacher, params, backend="reference", **kw)
    ref_loss, ref = run(student, teacher, params, backend="reference", dtype=torch.float32, **kw)
    assert_kernel_close("mgd_loss", dtype, fast_loss, ref_loss, plain_loss, name="loss")
    for name in ref:
        assert fast[name].dtype == dtype, name
        assert_kernel_close("mgd_loss", dtype, fast[name], ref[name], plain[name], name=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("alpha", [1e-5, 5e-7])
def test_tiny_alpha_under_loss_scaling(dtype, alpha):
    """Real alphas with a GradScaler-sized dL/dloss: 2 alpha/N (G - T) underflows fp16, so the kernels must
    keep that factor in fp32 and apply it together with g (not round D = 2 alpha/N (G - T) to the dtype)."""
    student, teacher, params = make_inputs(2, 16, 16, 5, 9, seed=3)
    student, teacher = student.to(dtype), teacher.to(dtype)
    params = {k: v.to(dtype) for k, v in params.items()}
    kw = dict(mask="spatial", ratio=0.65, alpha=alpha, seed=7, sample_offset=0, grad_out=65536.0)
    fast_loss, fast = run(student, teacher, params, backend="triton", **kw)
    plain_loss, plain = run(student, teacher, params, backend="reference", **kw)
    ref_loss, ref = run(student, teacher, params, backend="reference", dtype=torch.float32, **kw)
    assert_kernel_close("mgd_loss", dtype, fast_loss, ref_loss, plain_loss, name="loss")
    for name in ref:
        assert_kernel_close("mgd_loss", dtype, fast[name], ref[name], plain[name], name=f"d{name}")


@pytest.mark.parametrize("mode,shape", [("spatial", (3, 16, 7, 7)), ("channel", (3, 24, 5, 9)),
                                        ("spatial", (5, 16, 2, 3)), ("channel", (9, 16, 2, 2))])
def test_kernel_mask_is_the_contract_mask(mode, shape):
    """The mask the kernels apply while loading (the same helpers as conv1's input loads), bit for bit.
    (5, 2, 3) and (9, 2, 2) put many samples in one row tile (the per-row Philox branch)."""
    from fastkd.ops.mgd_triton import applied_keep_mask

    n, c, h, w = shape
    for seed, offset in ((7, 0), (2**40 + 3, 11), (2**63 + 5, 2)):
        got = applied_keep_mask(mode, n, c, h, w, ratio=0.45, seed=seed, sample_offset=offset, device=DEVICE)
        want = mgd_keep_mask(mode, n, c, h, w, ratio=0.45, seed=seed, sample_offset=offset, device=DEVICE)
        want = want.expand(n, c, h, w)
        assert torch.equal(got, want), (mode, shape, seed, offset)


def test_student_gradient_is_zero_exactly_where_dropped():
    """dS = keep * (...): the backward regenerates the same mask (checked through a gradient)."""
    n, c, h, w = 2, 16, 5, 9
    student, teacher, params = make_inputs(n, c, c, h, w)
    for mode in ("spatial", "channel"):
        _, grads = run(student, teacher, params, backend="triton", mask=mode, ratio=0.5, alpha=1.0, seed=42,
                       sample_offset=4)
        keep = mgd_keep_mask(mode, n, c, h, w, ratio=0.5, seed=42, sample_offset=4, device=DEVICE)
        keep = keep.expand(n, c, h, w)
        assert torch.equal(grads["student"] != 0, keep.bool()), mode


@pytest.mark.parametrize("cs", [16, 24])
def test_feature_sized_buffers_are_only_the_designed_ones(cs):
    """Every feature-sized tensor (N*Ct*H*W or N*Cs*H*W elements) the host code allocates: forward A (align
    only), H1 and D = G - T; backward dH1, dA (align only) and dS. So no mask, masked input or G (nor an
    upcast or permuted copy of S or T) ever exists in memory."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastkd.ops import mgd_triton

    n, ct, h, w = 2, 16, 5, 9
    big = n * ct * h * w
    student, teacher, params = make_inputs(n, cs, ct, h, w)
    aw, ab = params.get("align_w"), params.get("align_b")

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided,
                                       torch.ops.aten.empty_like, torch.ops.aten.zeros,
                                       torch.ops.aten.new_empty, torch.ops.aten.new_zeros):
                self.sizes.append(out.numel())
            return out

    with Allocations() as fwd:
        _, a, hidden, dg = mgd_triton.mgd_forward(student, teacher, params["gen_w1"], params["gen_b1"],
                                                  params["gen_w2"], params["gen_b2"], aw, ab, "spatial", 0.5,
                                                  1.0, 3, 0, True)
    with Allocations() as bwd:
        mgd_triton.mgd_backward(torch.tensor(1.0, device=DEVICE), student, params["gen_w1"], params["gen_w2"], aw, a,
                                hidden, dg, "spatial", 0.5, 1.0, 3, 0, [True] * 7)
    align = aw is not None
    feature = lambda sizes: sorted(x for x in sizes if x in (big, n * cs * h * w))  # noqa: E731
    assert feature(fwd.sizes) == [big] * (2 + align)  # [A], H1, D
    assert feature(bwd.sizes) == sorted([big] * (1 + align) + [n * cs * h * w])  # dH1, [dA], dS


def test_same_seed_is_bit_identical_and_seed_matters():
    student, teacher, params = make_inputs(2, 16, 16, 5, 9)
    kw = dict(mask="spatial", ratio=0.65, alpha=1.0, sample_offset=0)
    a, ga = run(student, teacher, params, backend="triton", seed=5, **kw)
    b, gb = run(student, teacher, params, backend="triton", seed=5, **kw)
    assert torch.equal(a, b)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    c, _ = run(student, teacher, params, backend="triton", seed=6, **kw)
    assert not torch.equal(a, c)


def test_no_grad_forward_and_module():
    from fastkd.losses.mgd import MGD

    torch.manual_seed(0)
    module = MGD(24, 16, mask="channel", ratio=0.15, alpha=7e-5, backend="triton").to(DEVICE)
    student, teacher, _ = make_inputs(2, 24, 16, 5, 9)
    with torch.no_grad():
        fused = module(student, teacher, seed=3)
        module.backend = "reference"
        ref = module(student, teacher, seed=3)
    assert_kernel_close("mgd_loss", torch.float32, fused, ref, name="module loss")


def test_short_training_run_matches_reference():
    """A few SGD steps of a student + MGD module with the fused path and with the reference: the same
    loss curve (a fresh mask every step from the module's seed stream)."""
    from fastkd.losses.mgd import MGD

    curves = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        student_net = torch.nn.Conv2d(3, 16, 3, padding=1).to(DEVICE)
        mgd = MGD(16, 24, mask="spatial", ratio=0.5, alpha=1e-2, seed=5, backend=backend).to(DEVICE)
        opt = torch.optim.SGD([*student_net.parameters(), *mgd.parameters()], lr=0.05)
        x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        teacher = torch.randn(2, 24, 5, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        losses = []
        for _ in range(6):
            loss = mgd(student_net(x), teacher)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[backend] = torch.tensor(losses)
    assert curves["reference"][-1] < curves["reference"][0]
    assert_kernel_close("mgd_loss", torch.float32, curves["triton"], curves["reference"], name="loss curve")


def test_refusals_say_why():
    student, teacher, params = make_inputs(1, 16, 16, 3, 3, dtype=torch.float64)
    reasons = dict(explain("mgd_loss", DEVICE, student=student, teacher=teacher, gen_w1=params["gen_w1"],
                           align_w=None, mask="spatial"))
    assert "float64" in reasons["triton"]


def _compile_case():
    student, teacher, params = make_inputs(2, 24, 16, 5, 7, channels_last=True)
    return student, teacher, [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2", "align_w", "align_b")]


def _loss_and_grads(fn, student, teacher, weights, seed):
    s = student.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in weights]
    out = fn(s, teacher, *ws, seed)
    out.backward()
    return [out.detach(), s.grad] + [w.grad for w in ws]


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) of a function calling ``fastkd.ops.mgd_loss(backend="triton")``
    (custom ops + fake impls + registered autograd): loss and gradients bit for bit as eager, for two
    seeds (the second call makes the seed dynamic instead of recompiling per step). On the CPU the op
    runs the interpreted kernels and the graph around it uses aot_eager (the GPU test uses inductor)."""
    def step(s, t, w1, b1, w2, b2, aw, ab, seed):
        loss = mgd_loss(s, t, w1, b1, w2, b2, align_w=aw, align_b=ab, mask="spatial", ratio=0.5, alpha=0.2,
                        seed=seed, backend="triton")
        return loss * 3.0 + 1.0

    args = _compile_case()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in (77, 78):
        for a, b in zip(_loss_and_grads(step, *args, seed=seed), _loss_and_grads(compiled, *args, seed=seed)):
            assert torch.equal(a, b)


def test_opcheck_fake_and_autograd_registration():
    from fastkd.ops import mgd_triton

    student, teacher, params = make_inputs(1, 16, 16, 3, 3)
    args = (student.requires_grad_(), teacher, params["gen_w1"].requires_grad_(), params["gen_b1"],
            params["gen_w2"], params["gen_b2"], None, None, "channel", 0.5, 1.0, 3, 0, True)
    torch.library.opcheck(mgd_triton._mgd_op.forward_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    student, teacher, params = make_inputs(1, 24, 16, 3, 3, channels_last=True)
    aw, w1, w2 = params["align_w"], params["gen_w1"], params["gen_w2"]
    _, a, hidden, dg = mgd_triton._mgd_op.forward_op(student, teacher, w1, params["gen_b1"], w2, params["gen_b2"],
                                                     aw, params["align_b"], "spatial", 0.5, 1.0, 3, 0, True)
    for needs in ([True] * 7, [False, True, False, True, False, False, True]):
        grad = torch.tensor(0.5, device=DEVICE)
        torch.library.opcheck(mgd_triton._mgd_op.backward_op, (grad, student, w1, w2, aw, a, hidden, dg, "spatial",
                                                               0.5, 1.0, 3, 0, needs),
                              test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------ GPU
# The shapes (bf16), reduced in batch where the float32 reference would be slow.
GPU_CASES = [
    ("cls R34->R18", 32, 512, 512, 7, 7, "channel", 0.15),
    ("cls R50->MBv1", 32, 1024, 2048, 7, 7, "channel", 0.15),
    ("det P3", 2, 256, 256, 100, 168, "spatial", 0.65),
    ("det P7", 16, 256, 256, 7, 11, "spatial", 0.65),
    ("seg", 1, 512, 2048, 64, 128, "spatial", 0.75),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,n,cs,ct,h,w,mask,ratio", GPU_CASES)
def test_gpu_real_shapes_bf16(name, n, cs, ct, h, w, mask, ratio):
    student, teacher, params = make_inputs(n, cs, ct, h, w, dtype=torch.bfloat16, channels_last=True,
                                           device="cuda")
    kw = dict(mask=mask, ratio=ratio, alpha=2e-5, seed=2024, sample_offset=0)
    fast_loss, fast = run(student, teacher, params, backend="triton", **kw)
    plain_loss, plain = run(student, teacher, params, backend="reference", **kw)
    ref_loss, ref = run(student, teacher, params, backend="reference", dtype=torch.float32, **kw)  # IEEE fp32
    assert_kernel_close("mgd_loss", torch.bfloat16, fast_loss, ref_loss, plain_loss, name="loss")
    for g in ref:
        assert_kernel_close("mgd_loss", torch.bfloat16, fast[g], ref[g], plain[g], name=f"d{g}")
    again, _ = run(student, teacher, params, backend="triton", **kw)
    assert torch.equal(again, fast_loss)  # deterministic on the device


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["spatial", "channel"])
def test_gpu_float32_exact_dots(mask):
    student, teacher, params = make_inputs(4, 96, 64, 19, 23, device="cuda")  # IEEE fp32 (fixture)
    kw = dict(mask=mask, ratio=0.5, alpha=0.3, seed=11, sample_offset=2)
    loss, grads = run(student, teacher, params, backend="triton", **kw)
    ref_loss, ref_grads = run(student, teacher, params, backend="reference", **kw)
    assert_kernel_close("mgd_loss", torch.float32, loss, ref_loss, name="loss")
    for g in grads:
        assert_kernel_close("mgd_loss", torch.float32, grads[g], ref_grads[g], name=f"d{g}")


@pytest.mark.gpu
def test_gpu_compile_inductor():
    student, teacher, params = make_inputs(4, 256, 256, 25, 42, dtype=torch.bfloat16, channels_last=True,
                                           device="cuda")

    def f(s, seed):
        return mgd_loss(s, teacher, params["gen_w1"], params["gen_b1"], params["gen_w2"], params["gen_b2"],
                        mask="spatial", ratio=0.65, alpha=2e-5, seed=seed, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(student, 3), f(student, 3))


# A GPU-free check of the compiled path: the interpreter never runs the code generator, so compile the
# main kernel variants for Hopper (sm_90, ptxas ships with triton) in a subprocess without
# TRITON_INTERPRET, with the divisibility facts a real launch specialises on, and check the bf16
# convolution main loops become pipelined (async copies) warpgroup MMAs.
_SM90_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastkd.ops import mgd_triton as M

def build(kernel, dtypes, consts):
    fn = kernel.fn
    sig = {}
    for name in fn.arg_names:
        if name in consts: sig[name] = "constexpr"
        elif name.endswith("_ptr"): sig[name] = "*" + dtypes.get(name, "fp32")
        elif name == "seed": sig[name] = "u64"
        elif name == "sample_offset": sig[name] = "i64"
        elif name in ("ratio", "scale"): sig[name] = "fp32"
        else: sig[name] = "i32"
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or (n.startswith("s") and n not in consts
               and n not in ("seed", "sample_offset", "scale"))]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=8, num_stages=3)).asm["ttgir"]

bf = {n: "bf16" for n in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "aux_ptr", "dy_ptr")}
tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
conv = dict(sxc=1, swn=1, syc=1, sac=1, CIN=256, COUT=256, SPAN=2, KSIZE=3, FLIP=False, KEEP_IN=0, KEEP_OUT=0,
            EPILOGUE=0, HAS_BIAS=True, WRITE_Y=True, DOT_PREC="tf32", GROUP_M=8, **tile)
dgrad = {k: v for k, v in conv.items() if k != "swn"}  # input gradient: the reduction runs along Cout
for name, consts in (("conv1", dict(conv, KEEP_IN=1, EPILOGUE=1)), ("conv2", dict(conv, EPILOGUE=2)),
                     ("dgrad1", dict(dgrad, swk=1, FLIP=True, EPILOGUE=4, KEEP_OUT=2, SPAN=4, HAS_BIAS=False))):
    ir = build(M._conv_fwd_kernel, bf, consts)
    assert "warp_group_dot" in ir and "async_copy_global_to_local" in ir, name
wg = dict(sxc=1, sdc=1, CIN=256, COUT=256, SPAN=2, P_CHUNK=4096, KSIZE=3, KEEP_IN=1, DOT_PREC="tf32", **tile)
assert "warp_group_dot" in build(M._conv_wgrad_kernel, bf, wg)
sum_rows = type("Plain", (), {"fn": M._sum_rows_kernel})  # build() takes an autotuner's .fn
build(sum_rows, {"out_ptr": "bf16"}, dict(R=7, HAS_G=True, BLOCK=1024))  # rows walked by 64-bit pointers
# seed / sample_offset: one type whatever the value, never value-specialised (no recompiles for new seeds)
for kernel in (M._conv_fwd_kernel, M._conv_wgrad_kernel):
    params = {p.name: p for p in kernel.fn.params}
    for name, ty in (("seed", "u64"), ("sample_offset", "i64")):
        assert params[name].do_not_specialize and params[name].annotation_type == ty, (name, ty)
print("ok")
'''


def test_kernels_compile_for_hopper():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
