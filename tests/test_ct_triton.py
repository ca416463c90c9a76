"""The fused Triton CT loss (fastkd.ops.ct_triton) against the reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) at small odd shapes; the
tests marked ``gpu`` run the compiled kernels at real shapes. Tolerances: fastkd.testing.KERNEL_TOLERANCES.
"""
from __future__ import annotations

import pytest
import torch

import fastkd.ops as ops
from fastkd.losses.ct import CT
from fastkd.ops import ct_triton, reference
from fastkd.testing import assert_kernel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("loss", "d_student", "d_w1", "d_b1", "d_w2", "d_b2")

# (N, Cs, Ch, Ct, H, W): odd channel counts (not multiples of 16), 1x1 and odd spatial sizes.
SHAPES = [(2, 12, 20, 24, 5, 7), (3, 5, 7, 3, 1, 1), (1, 17, 33, 9, 3, 13)]


def make_inputs(n, cs, ch, ct, h, w, dtype=torch.float32, channels_last=False, weights_4d=False, seed=0,
                device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    s, t = rnd(n, cs, h, w), rnd(n, ct, h, w)
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    w1, w2 = rnd(ch, cs, scale=cs ** -0.5), rnd(ct, ch, scale=ch ** -0.5)
    if weights_4d:
        w1, w2 = w1[:, :, None, None], w2[:, :, None, None]
    return s, t, (w1, rnd(ch, scale=0.1), w2, rnd(ct, scale=0.1))


def loss_and_grads(fn, s, t, weights, grad_out=1.7, **kw):
    """[loss, dS, dW1, db1, dW2, db2] of fn(student, teacher, *weights) with dL/dloss = grad_out."""
    leaves = [x.detach().clone().requires_grad_() for x in (s, *weights)]
    loss = fn(leaves[0], t, *leaves[1:], **kw)
    loss.backward(torch.tensor(grad_out, device=loss.device))
    return [loss.detach()] + [x.grad for x in leaves]


def fused(*args, **kw):
    return ops.ct_loss(*args, backend="triton", **kw)


def check_against_reference(dtype, s, t, weights, **kw):
    fast = loss_and_grads(fused, s, t, weights, **kw)
    exact = loss_and_grads(reference.ct_loss, s, t, weights, upcast=True, **kw)
    plain = loss_and_grads(reference.ct_loss, s, t, weights, **kw) if dtype != torch.float32 else [None] * 6
    assert fast[0].dtype == torch.float32 and fast[0].dim() == 0
    for name, f, e, p in zip(NAMES, fast, exact, plain):
        assert f.dtype == e.dtype or name == "loss", f"{name}: dtype {f.dtype} != {e.dtype}"
        assert_kernel_close("ct_loss", dtype, f.float(), e.float(), None if p is None else p.float(), name=name)
    return fast


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["sum_over_batch", "mean"])
def test_float32_matches_reference(shape, reduction):
    s, t, weights = make_inputs(*shape)
    check_against_reference(torch.float32, s, t, weights, alpha=0.37, reduction=reduction)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("weights_4d", [False, True], ids=["w2d", "w4d"])
def test_layouts_and_weight_shapes(channels_last, weights_4d):
    s, t, weights = make_inputs(2, 12, 20, 24, 5, 7, channels_last=channels_last, weights_4d=weights_4d)
    fast = check_against_reference(torch.float32, s, t, weights, alpha=0.5, grad_out=-0.8)
    ds = fast[1]
    assert ds.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert fast[2].shape == weights[0].shape and fast[4].shape == weights[2].shape


def test_strided_views():
    """A channel slice is read through its strides; a spatial slice (H, W not flattenable) still works."""
    s, t, weights = make_inputs(2, 16, 20, 24, 5, 9)
    check_against_reference(torch.float32, s[:, 2:14], t, (weights[0][:, 2:14].contiguous(), *weights[1:]))
    check_against_reference(torch.float32, s[:, :, :, 1:8], t[:, :, :, 2:9], weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("reduction", ["sum_over_batch", "mean"])
def test_low_precision_error_within_plain_pytorch(dtype, channels_last, reduction):
    s, t, weights = make_inputs(2, 12, 20, 24, 5, 7, dtype=dtype, channels_last=channels_last, seed=1)
    fast = check_against_reference(dtype, s, t, weights, alpha=0.5, reduction=reduction)
    assert all(g.dtype == dtype for g in fast[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("alpha", [1e-5, 5e-7])
@pytest.mark.parametrize("reduction", ["sum_over_batch", "mean"])
def test_tiny_alpha_under_loss_scaling(dtype, alpha, reduction):
    """Real alphas with a GradScaler-sized dL/dloss: 2 alpha/D (Y - T) underflows fp16, so the kernels must
    keep that factor in fp32 and apply it together with g (not round dY = 2 alpha/D (Y - T) to the dtype)."""
    s, t, weights = make_inputs(2, 12, 20, 24, 5, 7, dtype=dtype, seed=2)
    check_against_reference(dtype, s, t, weights, alpha=alpha, reduction=reduction, grad_out=65536.0)


def test_deterministic():
    s, t, weights = make_inputs(2, 12, 20, 24, 5, 7, dtype=torch.bfloat16)
    first = loss_and_grads(fused, s, t, weights)
    second = loss_and_grads(fused, s, t, weights)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_partial_gradients_and_no_grad():
    s, t, (w1, b1, w2, b2) = make_inputs(2, 12, 20, 24, 5, 7)
    expected = loss_and_grads(reference.ct_loss, s, t, (w1, b1, w2, b2))
    # frozen transform: only the student wants a gradient
    s1 = s.clone().requires_grad_()
    fused(s1, t, w1, b1, w2, b2).backward(torch.tensor(1.7))
    assert_kernel_close("ct_loss", torch.float32, s1.grad, expected[1], name="d_student")
    # frozen student: only the transform's parameters
    leaves = [x.clone().requires_grad_() for x in (w1, b1, w2, b2)]
    fused(s, t, *leaves).backward(torch.tensor(1.7))
    for name, leaf, e in zip(NAMES[2:], leaves, expected[2:]):
        assert_kernel_close("ct_loss", torch.float32, leaf.grad, e, name=name)
    # teacher never receives a gradient; no_grad gives the same loss
    t1 = t.clone().requires_grad_()
    fused(s1, t1, w1, b1, w2, b2).backward()
    assert t1.grad is None
    with torch.no_grad():
        loss = fused(s, t, w1, b1, w2, b2)
    assert torch.equal(loss, fused(s, t, w1, b1, w2, b2).detach())
    assert_kernel_close("ct_loss", torch.float32, loss, reference.ct_loss(s, t, w1, b1, w2, b2), name="loss")


@pytest.mark.parametrize("align", [32, 64, 128])
def test_weight_gradient_row_splits_waste_little(align):
    """split_rows (both kernels' weight gradients): chunks are multiples of the alignment (a static loop
    bound over whole BLOCK_K steps), cover every row, and the last split is more than half full, so fully
    masked iterations stay a small share (FPN P3 with power-of-two chunks wasted ~22%)."""
    from fastkd.ops._triton_common import split_rows

    for rows in [*range(1, 3000, 37), 16 * 100 * 152, 2 * 100 * 168, 16 * 7 * 11, 256 * 49, 123457]:
        for want in (1, 2, 3, 7, 16, 33, 66, 132, 264):
            splits, chunk = split_rows(rows, want, align)
            assert 1 <= splits <= want and chunk % align == 0
            assert (splits - 1) * chunk < rows <= splits * chunk, (rows, want)
            assert splits == 1 or 2 * (splits * chunk - rows) < chunk, (rows, want, splits, chunk)
    assert split_rows(16 * 100 * 152, 66, 128) == (66, 3712)  # P3: 0.7% of the rows masked, not 22%


def test_backward_twice_with_retained_graph():
    s, t, weights = make_inputs(2, 12, 20, 24, 5, 7)
    s = s.requires_grad_()
    loss = fused(s, t, *weights)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first, rtol=0, atol=0)


def test_memory_written_is_hidden_and_gradients_only():
    """Forward allocates H [M, Ch] and E = Y - T [M, Ct]; backward dP [M, Ch] and dS; nothing else row-sized
    (no Y, no dY, no fp32 copy, no permuted copy of S or T): only small per-tile partials."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view or func._schema.is_mutable:  # no new memory (the interpreter's set_ too)
                return out
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= 8 * 512 * 4:
                    self.shapes.append((str(func.overloadpacket.__name__), tuple(t.shape)))
            return out

    s, t, (w1, b1, w2, b2) = make_inputs(2, 12, 20, 24, 16, 16, channels_last=True)  # M = 512 rows
    with Allocations() as fwd:
        loss, hidden, err, err_sum = ct_triton.ct_forward(s, t, w1, b1, w2, b2, 0.5, "mean", True)
    assert sorted(shape for _, shape in fwd.shapes) == [(512, 20), (512, 24)], fwd.shapes
    with Allocations() as bwd:
        grads = ct_triton.ct_backward(torch.tensor(1.0), s, w1, w2, hidden, err, err_sum, 0.5, "mean", [True] * 5)
    assert sorted(shape for _, shape in bwd.shapes) == [(2, 12, 16, 16), (512, 20)], bwd.shapes
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_module_matches_reference_module():
    torch.manual_seed(0)
    fast_mod = CT(12, 24, 20, alpha=0.3, backend="triton").to(DEVICE)
    ref_mod = CT(12, 24, 20, alpha=0.3, backend="reference").to(DEVICE)
    ref_mod.load_state_dict(fast_mod.state_dict())
    s, t, _ = make_inputs(2, 12, 20, 24, 5, 7)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    l1, l2 = fast_mod(s1, t), ref_mod(s2, t)
    (l1 * 2).backward()
    (l2 * 2).backward()
    assert_kernel_close("ct_loss", torch.float32, l1.detach(), l2.detach(), name="loss")
    assert_kernel_close("ct_loss", torch.float32, s1.grad, s2.grad, name="d_student")
    for (name, p1), p2 in zip(fast_mod.named_parameters(), ref_mod.parameters()):
        assert_kernel_close("ct_loss", torch.float32, p1.grad, p2.grad, name=name)


def test_training_steps_track_reference():
    """A few SGD steps of a CT transform, fused vs reference: the loss curves agree."""
    s, t, weights = make_inputs(2, 12, 20, 24, 5, 7)
    curves = []
    for fn in (fused, reference.ct_loss):
        params = [w.clone().requires_grad_() for w in weights]
        opt = torch.optim.SGD(params, lr=0.02)
        curve = []
        for _ in range(8):
            opt.zero_grad()
            loss = fn(s, t, *params, alpha=0.1)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    assert curves[1][-1] < 0.9 * curves[1][0]  # the transform learns
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-4, atol=0)


def test_refuses_unsupported_inputs():
    s, t, (w1, b1, w2, b2) = make_inputs(1, 4, 4, 4, 2, 2, dtype=torch.float64)
    why = ct_triton.refuse(student=s, teacher=t, w1=w1, w2=w2)
    assert why and "float64" in why
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        fused(s, t, w1, b1, w2, b2)
    s, t, (w1, b1, w2, b2) = make_inputs(1, 4, 4, 4, 2, 2)
    assert "empty" in ct_triton.refuse(student=s[:0], teacher=t[:0], w1=w1, w2=w2)
    assert ct_triton.refuse(student=s, teacher=t, w1=w1, w2=w2) is None


def test_custom_op_registration():
    """Fake (meta) kernels, schema and autograd registration agree with the real ones."""
    s, t, (w1, b1, w2, b2) = make_inputs(2, 12, 20, 24, 5, 7)
    s, w1 = s.requires_grad_(), w1.requires_grad_()
    fwd = ct_triton._ct_op.forward_op
    for needs_grad in (True, False):
        torch.library.opcheck(fwd, (s, t, w1, b1, w2, b2, 0.5, "mean", needs_grad),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    s, t, weights = make_inputs(2, 12, 20, 24, 5, 7)

    def step(s, t, w1, b1, w2, b2):
        return 2.0 * ct_triton.ct_loss(s, t, w1, b1, w2, b2, alpha=0.5, reduction="sum_over_batch") + 1.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    got = loss_and_grads(compiled, s, t, weights, grad_out=1.0)
    want = loss_and_grads(lambda *a: 2.0 * reference.ct_loss(*a, alpha=0.5) + 1.0, s, t, weights, grad_out=1.0)
    for name, g, w in zip(NAMES, got, want):
        assert_kernel_close("ct_loss", torch.float32, g, w, name=name)


def test_torch_compile_fullgraph_public_api():
    """fastkd.ops.ct_loss(..., backend="triton") inside a compiled function: validation and dispatch
    trace without graph breaks; loss and gradients unchanged."""
    s, t, weights = make_inputs(2, 12, 20, 24, 5, 7)
    step = lambda *a: ops.ct_loss(*a, alpha=0.5, reduction="mean", backend="triton")  # noqa: E731
    eager = loss_and_grads(step, s, t, weights)  # also the dispatcher's one lazy import, done eagerly
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    for name, g, e in zip(NAMES, loss_and_grads(compiled, s, t, weights), eager):
        assert torch.equal(g, e), f"{name}: compiled differs from eager"


_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastkd.ops import ct_triton as C

def build(jit, types, constexprs, cfg):
    ce = {**constexprs, **cfg.kwargs}
    sig = {n: "constexpr" if n in ce else types.get(n, "i64") for n in jit.arg_names}
    src = ASTSource(jit, sig, constexprs={(jit.arg_names.index(k),): v for k, v in ce.items()})
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)

for dt, epis in (("bf16", range(4)), ("fp16", (1,)), ("fp32", (1, 2))):  # fp32: TF32 (1), IEEE (2)
    ptrs = {n: "*" + dt for n in ("x_ptr", "w_ptr", "bias_ptr", "out_ptr", "aux_ptr", "a_ptr", "b_ptr")}
    types = {**ptrs, "part_ptr": "*fp32", "dbp_ptr": "*fp32", "g_ptr": "*fp32"}
    for epi in epis:
        prec = "ieee" if dt == "fp32" and epi == 2 else "tf32"
        k = build(C._row_gemm_kernel.fn, types, dict(K=200, EPI=epi, STORE_OUT=True, DOT_PREC=prec),
                  C._row_configs(90, 2)[-1])
        assert dt == "fp32" or "wgmma" in k.asm["ptx"], "bf16/fp16 GEMM not on the Hopper tensor cores"
    build(C._weight_grad_kernel.fn, {**types, "out_ptr": "*fp32"},
          dict(ROWS_PER_SPLIT=3712, DOT_PREC="ieee" if dt == "fp32" else "tf32"), C._wg_configs(90, 2)[-1])
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """The kernels compile to sm_90 machine code (ptxas) without a GPU, outside the interpreter."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------- GPU, real shapes

GPU_SHAPES = {  # (N, Cs, Ch, Ct, H, W)
    "fpn_p5": (16, 256, 256, 256, 25, 42),
    "cls_r34_r18": (256, 512, 512, 512, 7, 7),
    "cls_r50_mbv1": (64, 1024, 2048, 2048, 7, 7),
    "odd": (3, 200, 333, 100, 17, 19),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gpu_real_shapes(shape, dtype, channels_last, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32: IEEE on both sides
    s, t, weights = make_inputs(*shape, dtype=dtype, channels_last=channels_last)
    check_against_reference(dtype, s, t, weights, alpha=2e-5)


@pytest.mark.gpu
def test_gpu_deterministic_and_compiled():
    s, t, weights = make_inputs(*GPU_SHAPES["fpn_p5"], dtype=torch.bfloat16, channels_last=True)
    first, second = (loss_and_grads(fused, s, t, weights) for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    compiled = torch.compile(lambda *a: ct_triton.ct_loss(*a, alpha=1.0), fullgraph=True)
    for name, a, b in zip(NAMES, loss_and_grads(compiled, s, t, weights), first):
        assert torch.equal(a, b), f"{name}: compiled differs from eager"
