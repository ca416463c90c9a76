"""The parts of ``benchmarks/gpu_check.py``: each one function of a context, run in its own process.

A part records what it finds through the context as it goes (``ctx.row`` for a table row, ``ctx.check``
for a pass/fail check, ``ctx.target`` for a target of an issue, met or missed), so a part stopped at its
time limit keeps every row it finished. ``ctx.dry`` is true in the dry run (no CUDA: the Triton kernels
under TRITON_INTERPRET=1, tiny shapes, one repetition; the figures mean nothing there).

Adding a part (e.g. detection or segmentation training-step rows): write ``def my_part(ctx)`` here and
append ``Part("my-part", my_part, limit_s=..., dry_limit_s=..., targets=[...])`` to ``PARTS``; order is
run order. ``targets`` lists the target names the part should report, so that a part that never reached
one still shows it as not measured in the summary. A part that does not fit the first 7-minute window gets
``window=2``: a plain run skips it, ``--parts environment,<it>`` runs it (the dry run runs every part).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import itertools
import multiprocessing
import os
import platform
import subprocess
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.common import bench, device_peaks, peak_memory_bytes
from benchmarks.gpu_records import Context


@dataclasses.dataclass
class Part:
    """One part of the GPU check."""

    name: str
    """Its name (--parts, the summary, the records)."""
    run: Callable[[object], None]
    """The part itself: called with the context in a fresh process."""
    limit_s: float
    """Wall-clock limit on the GPU, the process's start included."""
    dry_limit_s: float
    """Wall-clock limit in the dry run."""
    targets: List[str] = dataclasses.field(default_factory=list)
    """Names of the targets it reports (shown as not measured when it does not get to them)."""
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    """Extra environment of its process (e.g. the Triton tuning mode)."""
    window: int = 1
    """The device window that runs it by default: 1 = a plain ``gpu_check.py`` (the 7-minute window); 2 = a
    second invocation that names it with --parts (see WINDOW_2). The dry run runs every part."""


def compile_backend(ctx) -> str:
    """torch.compile's backend: Inductor on the GPU; in the dry run Dynamo + AOTAutograd without code
    generation (what fails on a graph break or an untraceable call fails there too; Inductor's CPU code
    generation would take minutes on a 2-core machine)."""
    return "aot_eager" if ctx.dry else "inductor"


def _try(ctx, name: str, fn: Callable[[], Optional[str]]) -> None:
    """Run one check; its return value is the detail. An AssertionError is a failed check, any other
    exception is recorded as a failed check with its type (the part goes on with the next check)."""
    t0 = time.perf_counter()
    try:
        detail = fn() or ""
        ok = True
    except AssertionError as exc:
        ok, detail = False, str(exc).splitlines()[0][:300] if str(exc) else "assertion failed"
    except Exception as exc:  # noqa: BLE001 - recorded with its type; the other checks still run
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    ctx.check(name, ok, detail, seconds=round(time.perf_counter() - t0, 2))
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ environment

def environment(ctx) -> None:
    """Device, driver, CUDA, torch, triton, date; the two ceilings (bf16 matrix product, device copy)."""
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda), "dry_run": ctx.dry}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(device=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    else:
        info.update(device=f"CPU {platform.machine()} x{os.cpu_count()} (dry run: Triton interpreter)")
    for key, value in info.items():
        ctx.row("environment", item=key, value=value)
    n = 1024 if ctx.dry else 8192
    a, b = (torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16) for _ in range(2))
    t = bench(lambda: a @ b, ctx.device, warmup=1, rep=3)
    ctx.row("environment", item="bf16 matmul TFLOP/s (measured)", value=round(2 * n ** 3 / t["ms"] / 1e9, 1))
    x = torch.empty(2**22 if ctx.dry else 2**30, device=ctx.device, dtype=torch.uint8)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), ctx.device, warmup=1, rep=3)
    ctx.row("environment", item="device copy GB/s (read+write, measured)",
            value=round(2 * x.numel() / t["ms"] / 1e6, 1))


# ------------------------------------------------------------------------------------------ correctness

# Real shapes of bench_mgd / bench_ct, batches reduced where the float32 reference would be slow.
MGD_CHECKS = {"cls R34->R18": (32, 512, 512, 7, 7, "channel", 0.15, 7e-5),
              "det FPN P3": (2, 256, 256, 100, 168, "spatial", 0.65, 2e-5),
              "seg R101->R18": (1, 512, 2048, 64, 128, "spatial", 0.75, 2e-5)}
CT_CHECKS = {"cls R50->MBv1": (64, 1024, 2048, 2048, 7, 7), "det FPN P5": (16, 256, 256, 256, 25, 42),
             "seg R18->R101": (1, 512, 2048, 2048, 64, 128)}
MGD_DRY = {"tiny spatial align": (2, 24, 16, 7, 7, "spatial", 0.65, 2e-5)}
CT_DRY = {"tiny odd": (2, 12, 20, 24, 5, 7)}
SEED = 2024


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _loss_and_grads(fn, s, t, params, dtype=None):
    """(loss, [grad of s and of every parameter]) of fn on fresh leaves (cast to ``dtype`` if given)."""
    leaves = _leaves([s, *params], dtype)
    loss = fn(leaves[0], t.to(dtype or t.dtype), *leaves[1:])
    (loss * 3.0).backward()  # a gradient of the loss other than 1 (the kernels scale by it)
    return loss.detach(), [x.grad for x in leaves]


def _mgd_fn(shape, backend):
    mask, ratio, alpha = shape[5:8]

    def fn(s, t, w1, b1, w2, b2, aw=None, ab=None):
        from fastkd.ops import mgd_loss, reference

        kw = dict(align_w=aw, align_b=ab, mask=mask, ratio=ratio, alpha=alpha, seed=SEED, sample_offset=3)
        if backend == "reference":
            return reference.mgd_loss(s, t, w1, b1, w2, b2, **kw)
        return mgd_loss(s, t, w1, b1, w2, b2, backend=backend, **kw)
    return fn


def _ct_fn(backend):
    def fn(s, t, w1, b1, w2, b2):
        from fastkd.ops import ct_loss, reference

        if backend == "reference":
            return reference.ct_loss(s, t, w1, b1, w2, b2, alpha=2e-5)
        return ct_loss(s, t, w1, b1, w2, b2, alpha=2e-5, backend=backend)
    return fn


def _against_reference(op, fn, ref_fn, s, t, params, dtype) -> str:
    """Loss and every gradient of the fused op against the reference (fp32 upcast; for bf16 also the
    reference in bf16 itself, the KERNEL_TOLERANCES rule of fastkd.testing)."""
    from fastkd.testing import assert_kernel_close

    loss, grads = _loss_and_grads(fn, s, t, params)
    ref_loss, ref_grads = _loss_and_grads(ref_fn, s, t, params, torch.float32)
    plain_loss, plain_grads = (None, [None] * len(grads))
    if dtype != torch.float32:
        plain_loss, plain_grads = _loss_and_grads(ref_fn, s, t, params)
    names = ["loss", "dS"] + [f"dparam{i}" for i in range(len(params))]
    for name, a, r, p in zip(names, [loss, *grads], [ref_loss, *ref_grads], [plain_loss, *plain_grads]):
        assert torch.isfinite(a).all(), f"{name}: not finite"
        assert_kernel_close(op, dtype, a, r.to(a.dtype) if dtype == torch.float32 else r, p, name=name)
    rel = (loss.double() - ref_loss.double()).abs().item() / max(ref_loss.abs().item(), 1e-30)
    return f"loss {loss.item():.6g}, fp32 reference {ref_loss.item():.6g} (rel. {rel:.1e}); {len(grads)} gradients ok"


def _first_call_compiled(ctx, dtype) -> str:
    """torch.compile(fullgraph=True) of both fused ops, whose first call (the process's first Triton use)
    happens inside the compiled region: same loss and gradients, bit for bit, as the eager op."""
    from benchmarks import bench_ct, bench_mgd

    shape_m = next(iter(MGD_DRY.values())) if ctx.dry else (4, 256, 256, 25, 42, "spatial", 0.65, 2e-5)
    shape_c = next(iter(CT_DRY.values())) if ctx.dry else (16, 256, 256, 256, 25, 42)
    out = []
    for op, fn, (s, t, params) in (
            ("mgd", _mgd_fn(shape_m, "triton"), bench_mgd.make(shape_m, dtype, ctx.device, channels_last=True)),
            ("ct", _ct_fn("triton"), bench_ct.make(shape_c, dtype, ctx.device, channels_last=True))):
        compiled = torch.compile(fn, fullgraph=True, backend=compile_backend(ctx))
        c_loss, c_grads = _loss_and_grads(compiled, s, t, params)
        e_loss, e_grads = _loss_and_grads(fn, s, t, params)
        assert torch.equal(c_loss, e_loss), f"{op}: compiled loss {c_loss.item()} != eager {e_loss.item()}"
        for i, (a, b) in enumerate(zip(c_grads, e_grads)):
            assert torch.equal(a, b), f"{op}: compiled gradient {i} differs from eager"
        out.append(f"{op} ok")
    return ", ".join(out)


def _mask_bits(ctx) -> str:
    from fastkd.ops.mask import mgd_keep_mask
    from fastkd.ops.mgd_triton import applied_keep_mask

    shapes = [(2, 16, 7, 9)] if ctx.dry else [(16, 256, 100, 168), (256, 512, 7, 7)]
    for mode in ("spatial", "channel"):
        for n, c, h, w in shapes:
            kw = dict(ratio=0.65, seed=2**63 + 12345, sample_offset=7)
            got = applied_keep_mask(mode, n, c, h, w, device=ctx.device, **kw)
            ref = mgd_keep_mask(mode, n, c, h, w, device=ctx.device, **kw).expand(n, c, h, w)
            assert torch.equal(got, ref), f"{mode} [{n},{c},{h},{w}]: {int((got != ref).sum())} mask entries differ"
    return "spatial and channel masks equal the reference's, entry for entry"


def _deterministic(ctx) -> str:
    """The same seed twice: the same loss and gradients, bit for bit (no float atomics)."""
    from benchmarks import bench_ct, bench_mgd

    shape_m = next(iter(MGD_DRY.values())) if ctx.dry else bench_mgd.SHAPES["det FPN P5"]
    shape_c = next(iter(CT_DRY.values())) if ctx.dry else bench_ct.SHAPES["det FPN P5"]
    for op, fn, (s, t, params) in (
            ("mgd", _mgd_fn(shape_m, "triton"), bench_mgd.make(shape_m, torch.bfloat16, ctx.device, True)),
            ("ct", _ct_fn("triton"), bench_ct.make(shape_c, torch.bfloat16, ctx.device, True))):
        first, second = (_loss_and_grads(fn, s, t, params) for _ in range(2))
        assert torch.equal(first[0], second[0]), f"{op}: loss differs between two runs"
        for i, (a, b) in enumerate(zip(first[1], second[1])):
            assert torch.equal(a, b), f"{op}: gradient {i} differs between two runs"
    return f"mgd {shape_m[:5]}, ct {shape_c}, bf16"


def correctness(ctx) -> None:
    """The fused ops against the reference at real shapes, the mask, determinism, torch.compile. The checks
    after the first run in a pool of processes: Triton compiles each process's kernels while the others
    compile theirs (nothing here is timed), the compiled kernels shared through the run's Triton cache."""
    # first, in this process: this must be the process's first use of the Triton kernels
    _try(ctx, "torch.compile(fullgraph) with the first call inside the region, bf16",
         lambda: _first_call_compiled(ctx, torch.bfloat16))
    mgd, ct = (MGD_DRY, CT_DRY) if ctx.dry else (MGD_CHECKS, CT_CHECKS)
    jobs = [("mask",), ("deterministic",)]
    jobs += [("vs reference", "MGD", name, "bf16") for name in mgd]
    jobs += [("vs reference", "CT", name, "bf16") for name in ct]
    # float32 (IEEE on both sides) at the FPN shapes
    jobs += [("vs reference", "MGD", name, "fp32") for name in (mgd if ctx.dry else ["det FPN P3"])]
    jobs += [("vs reference", "CT", name, "fp32") for name in (ct if ctx.dry else ["det FPN P5"])]
    spawn = multiprocessing.get_context("spawn")  # fresh processes: CUDA cannot be forked
    with concurrent.futures.ProcessPoolExecutor(max_workers=2 if ctx.dry else 8, mp_context=spawn) as pool:
        for _ in pool.map(_check_job, [(ctx.out, ctx.part, ctx.dry, job) for job in jobs]):
            pass


def _check_job(args) -> None:
    """One correctness check in a pool process (it records through its own context)."""
    out, part, dry, job = args
    ctx = Context(out, part, dry)
    if job[0] == "mask":
        _try(ctx, "MGD keep-mask bit-equal to the reference on the device", lambda: _mask_bits(ctx))
    elif job[0] == "deterministic":
        _try(ctx, "same seed twice: same loss and gradients, bit for bit", lambda: _deterministic(ctx))
    else:
        _, op, name, dname = job
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dname]
        torch.backends.cudnn.allow_tf32 = False  # float32: IEEE on both sides (TF32 is not a float32 result)
        shapes = {"MGD": MGD_DRY if dry else MGD_CHECKS, "CT": CT_DRY if dry else CT_CHECKS}[op]
        _try(ctx, f"{op} {name} {dname}: loss and gradients vs reference",
             lambda: _vs_reference(ctx, op, shapes[name], dtype))


def _vs_reference(ctx, op, shape, dtype) -> str:
    from benchmarks import bench_ct, bench_mgd

    if op == "MGD":
        return _against_reference("mgd_loss", _mgd_fn(shape, "triton"), _mgd_fn(shape, "reference"),
                                  *bench_mgd.make(shape, dtype, ctx.device, channels_last=True), dtype)
    return _against_reference("ct_loss", _ct_fn("triton"), _ct_fn("reference"),
                              *bench_ct.make(shape, dtype, ctx.device, channels_last=True), dtype)


# ---------------------------------------------------------------------------------------- kernel benchmarks

MGD_BENCH = ("det FPN P3", "cls R34->R18", "det FPN P5")  # in order of priority
CT_BENCH = ("det FPN P3", "cls R50->MBv1", "det FPN P5")


def kernel_targets() -> List[str]:
    names = []
    for shape in MGD_BENCH:
        if shape.startswith("det"):
            names += [f"MGD {shape}: fwd+bwd >= 1.3x compiled", f"MGD {shape}: fwd+bwd >= 1.5x eager"]
        else:
            names += [f"MGD {shape}: fwd+bwd >= 1.0x compiled"]
        names += [f"MGD {shape}: peak memory <= 0.5x eager", f"MGD {shape}: conv kernels >= 60% bf16 peak"]
    for shape in CT_BENCH:
        if shape.startswith("det"):
            names += [f"CT {shape}: fwd+bwd >= 2x eager", f"CT {shape}: fwd+bwd >= 1.3x compiled",
                      f"CT {shape}: >= 70% HBM roofline", f"CT {shape}: peak memory <= 0.5x eager"]
        else:
            names += [f"CT {shape}: fwd+bwd >= 1.0x compiled"]
    return names


def _impls(ctx, fused, eager):
    return {"fused": fused, "eager": eager,
            "compiled": torch.compile(eager, dynamic=False, backend=compile_backend(ctx))}


def _time_impls(ctx, impls, s, t, params, measure) -> Dict[str, dict]:
    results = {}
    with torch._functorch.config.patch(donated_buffer=False):  # the backward alone is re-run
        for impl, fn in impls.items():
            try:
                results[impl] = measure(fn, s, t, params)
            except Exception as exc:  # noqa: BLE001 - a failed implementation is a row, not the end of the part
                ctx.check(f"{impl} ran", False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return results


def _ratio_target(ctx, name, results, impl, need):
    if "fused" in results and impl in results:
        r = results[impl]["full"]["ms"] / results["fused"]["full"]["ms"]
        ctx.target(name, r >= need, f"{r:.2f}x")


def _mem_target(ctx, name, results):
    if "fused" in results and "eager" in results and results["fused"]["peak"] and results["eager"]["peak"]:
        r = results["fused"]["peak"] / results["eager"]["peak"]
        ctx.target(name, r <= 0.5, f"{r:.2f}x eager's peak")


def _mgd_bench(ctx, name, shape, dtype, peaks, reps):
    from benchmarks import bench_mgd

    n, cs, ct, h, w = shape[:5]
    s, t, params = bench_mgd.make(shape, dtype, ctx.device, channels_last=True)
    impls = _impls(ctx, bench_mgd.loss_fn("triton", *shape[5:8]), bench_mgd.loss_fn("reference", *shape[5:8]))
    results = _time_impls(ctx, impls, s, t, params,
                          lambda fn, *a: bench_mgd.measure(fn, *a, ctx.device, reps))
    fl_f, fl_b = bench_mgd.flops(n, cs, ct, h, w)
    for impl, res in results.items():
        for pas, fl in (("forward", fl_f), ("backward", fl_b), ("full", fl_f + fl_b)):
            ms = res[pas]["ms"]
            ctx.row("MGD kernels", shape=name, dims=f"{n} {cs}>{ct} {h}x{w}", impl=impl, **{"pass": pas},
                    ms=round(ms, 4),
                    vs_eager=_vs(results, "eager", pas, ms), vs_compiled=_vs(results, "compiled", pas, ms),
                    tflops=round(fl / ms / 1e9, 2), pct_bf16_peak=_pct(fl / ms / 1e9, peaks, "bf16_tflops"),
                    peak_mib=round(res["peak"] / 2**20, 1) if pas == "full" and res["peak"] else "-")
    _roofline_row(ctx, "mgd", name, shape, dtype, results)
    if name.startswith("det"):
        _ratio_target(ctx, f"MGD {name}: fwd+bwd >= 1.3x compiled", results, "compiled", 1.3)
        _ratio_target(ctx, f"MGD {name}: fwd+bwd >= 1.5x eager", results, "eager", 1.5)
    else:
        _ratio_target(ctx, f"MGD {name}: fwd+bwd >= 1.0x compiled", results, "compiled", 1.0)
    _mem_target(ctx, f"MGD {name}: peak memory <= 0.5x eager", results)
    if "fused" in results:
        if ctx.device.type == "cuda":
            conv_ms, other_ms = bench_mgd.conv_kernel_time_ms(impls["fused"], s, t, params)
        else:  # the dry run has no CUDA profiler: the whole fused pass stands in for its convolution kernels
            conv_ms, other_ms = results["fused"]["full"]["ms"], 0.0
        tf = (fl_f + fl_b) / conv_ms / 1e9
        ctx.row("MGD kernels", shape=name, impl="fused: conv kernels only", **{"pass": "full"},
                ms=round(conv_ms, 4), other_kernels_ms=round(other_ms, 4), tflops=round(tf, 2),
                pct_bf16_peak=_pct(tf, peaks, "bf16_tflops"))
        pct = 100 * tf / peaks["bf16_tflops"] if peaks else 0.0
        ctx.target(f"MGD {name}: conv kernels >= 60% bf16 peak", pct >= 60, f"{pct:.1f}%")


def _ct_bench(ctx, name, shape, dtype, peaks, reps):
    from benchmarks import bench_ct

    s, t, params = bench_ct.make(shape, dtype, ctx.device, channels_last=True)
    impls = _impls(ctx, bench_ct.fused, bench_ct.eager)
    results = _time_impls(ctx, impls, s, t, params,
                          lambda fn, *a: bench_ct.measure(lambda: fn, *a, ctx.device, reps))
    fl_f, fl_b, by_f, by_b, _ = bench_ct.work(*shape, s.element_size())
    for impl, res in results.items():
        for pas, fl, nbytes in (("forward", fl_f, by_f), ("backward", fl_b, by_b), ("full", fl_f + fl_b, by_f + by_b)):
            ms = res[pas]["ms"]
            ctx.row("CT kernels", shape=name, dims="{} {}>{}>{} {}x{}".format(*shape), impl=impl, **{"pass": pas},
                    ms=round(ms, 4),
                    vs_eager=_vs(results, "eager", pas, ms), vs_compiled=_vs(results, "compiled", pas, ms),
                    tflops=round(fl / ms / 1e9, 2), gbps=round(nbytes / ms / 1e6, 1),
                    pct_hbm=_pct(nbytes / ms / 1e9, peaks, "hbm_tbps", 1e3),
                    peak_mib=round(res["peak"] / 2**20, 1) if pas == "full" and res["peak"] else "-")
    _roofline_row(ctx, "ct", name, shape, dtype, results)
    if name.startswith("det"):
        _ratio_target(ctx, f"CT {name}: fwd+bwd >= 2x eager", results, "eager", 2.0)
        _ratio_target(ctx, f"CT {name}: fwd+bwd >= 1.3x compiled", results, "compiled", 1.3)
        _mem_target(ctx, f"CT {name}: peak memory <= 0.5x eager", results)
        if "fused" in results:
            gbps = (by_f + by_b) / results["fused"]["full"]["ms"] / 1e6
            pct = 100 * gbps / 1e3 / peaks["hbm_tbps"] if peaks else 0.0
            ctx.target(f"CT {name}: >= 70% HBM roofline", pct >= 70, f"{pct:.1f}% ({gbps:.0f} GB/s)")
    else:
        _ratio_target(ctx, f"CT {name}: fwd+bwd >= 1.0x compiled", results, "compiled", 1.0)


def _roofline_row(ctx, op, name, shape, dtype, results):
    """Measured forward+backward against the roofline bound on this device (benchmarks/roofline.py: max of
    FLOPs at the dense peak and compulsory bytes at the HBM bandwidth); '-' where the device is not modelled."""
    from benchmarks import roofline

    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else ""
    bound = roofline.lower_bound_ms(op, shape, dtype, device)
    for impl, res in results.items():
        ms = res["full"]["ms"]
        ctx.row("roofline", op=op.upper(), shape=name, impl=impl, ms=round(ms, 4),
                bound_ms=round(bound, 4) if bound else "-", pct_of_bound=round(100 * bound / ms, 1) if bound else "-")


def _vs(results, other, pas, ms):
    return f"{results[other][pas]['ms'] / ms:.2f}x" if other in results else "-"


def _pct(value, peaks, key, unit=1.0):
    return round(100 * value / (peaks[key] * unit), 1) if peaks else "-"


def kernels(ctx) -> None:
    """Fused vs eager vs torch.compile(reference), bf16 channels_last: forward, backward, both; TFLOP/s,
    GB/s, fraction of peak, peak memory; then the tuning table of the configs chosen here."""
    from benchmarks import bench_ct, bench_mgd

    from fastkd.ops import _tuning

    peaks = device_peaks(ctx.device)
    dtype, reps = torch.bfloat16, 1 if ctx.dry else 10
    mgd = {n: bench_mgd.TINY_SHAPES[n] for n in list(bench_mgd.TINY_SHAPES)[:1]} if ctx.dry else \
        {n: bench_mgd.SHAPES[n] for n in MGD_BENCH}
    ct = {n: bench_ct.TINY_SHAPES[n] for n in list(bench_ct.TINY_SHAPES)[:1]} if ctx.dry else \
        {n: bench_ct.SHAPES[n] for n in CT_BENCH}
    # interleaved by priority: a part stopped at its limit has the most important rows of both ops
    jobs = itertools.zip_longest([(_mgd_bench, "MGD", n, s) for n, s in mgd.items()],
                                 [(_ct_bench, "CT", n, s) for n, s in ct.items()])
    for bench_fn, op, name, shape in (j for pair in jobs for j in pair if j is not None):
        target_name = _DRY_AS.get(name, name)
        _try(ctx, f"{op} {name}: benchmarked", lambda: bench_fn(ctx, target_name, shape, dtype, peaks, reps))
        entries = _tuning.table_entries()  # after every shape: a stopped part keeps its tuning so far
        ctx.write_json("tuning.json", {"devices": {_tuning.device_name(ctx.device): entries}})


# The dry run's tiny shapes report under the real shapes' names (the same rows and targets as on the GPU).
_DRY_AS = {"tiny spatial align": "det FPN P3", "tiny odd": "det FPN P3"}


# -------------------------------------------------------------------------------------- training step

STEP_RECIPES = ("r34_r18_mgd", "r50_mbv1_mgd")


def step_targets() -> List[str]:
    return [t for r in STEP_RECIPES for t in (f"step {r}: kd-fused >= 1.2x kd-ref images/s",
                                              f"step {r}: overhead <= teacher share + 15%")]


def training_step(ctx) -> None:
    """benchmarks/bench_step.py's rows (batch 256, 224 px, bf16, channels_last; dry: the first recipe at
    2 x 32 px, fp32, no torch.compile, no memory pass) and the step issue's two targets per recipe."""
    from benchmarks import bench_step

    args = SimpleNamespace(batch=2 if ctx.dry else 256, size=32 if ctx.dry else 224, warmup=0 if ctx.dry else 3,
                           rep=1 if ctx.dry else 10, no_compile=ctx.dry, no_memory=ctx.dry)
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cols = ["recipe", "step", "ms", "ms_p20_p80", "images_s", "student_over_this", "overhead", "teacher_share",
            "explained_by_teacher", "peak_mib"]
    for recipe in STEP_RECIPES[:1] if ctx.dry else STEP_RECIPES:  # the recipes share one code path
        rows = bench_step.measure(recipe, args, ctx.device, dtype)
        ms = {}
        for row in rows:
            ctx.row("training step", **{c: (round(v, 3) if isinstance(v, float) else v) for c, v in zip(cols, row)})
            ms[row[1]] = row[2]
        fused = "kd-fused-eager" if ctx.dry else "kd-fused"
        r = ms["kd-ref"] / ms[fused]
        ctx.target(f"step {recipe}: kd-fused >= 1.2x kd-ref images/s", r >= 1.2, f"{r:.2f}x")
        overhead = ms[fused] / ms["student"] - 1
        share = ms[f"teacher fwd of {fused} ({'eager' if ctx.dry else 'compiled'})"] / ms["student"]
        ctx.target(f"step {recipe}: overhead <= teacher share + 15%", overhead <= share + 0.15,
                   f"overhead {100 * overhead:.0f}% vs share {100 * share:.0f}% + 15%")


# ------------------------------------------------------------------------------------ detection step

def detection_step(ctx) -> None:
    """bench_step.py --task detection's rows (benchmarks/step_detection.py): RetinaNet-R50 <- X101-64x4d at
    1333x800 (padded 1344x800), batch 2, bf16, channels_last: student, kd-ref, kd-auto (fused losses, eager),
    kd-fused (fused losses + the task's compiled dense part + compiled teacher), each with the teacher forward
    and the five MGD losses alone; dry: R18 <- R18 at 64x64 with 32-channel FPNs, fp32, not compiled."""
    from benchmarks import step_detection

    _dense_step(ctx, step_detection, "detection step")


def segmentation_step(ctx) -> None:
    """bench_step.py --task segmentation's rows (benchmarks/step_segmentation.py): PSPNet-R18 <- PSPNet-R101
    at 512x512, batch 8, bf16, MGD on layer4 + the channel-wise logit loss: student, kd-ref, kd-auto, kd-fused
    (the Distiller's compiled forward + compiled teacher); dry: R18 <- R18 at 64x64, fp32, not compiled."""
    from benchmarks import step_segmentation

    _dense_step(ctx, step_segmentation, "segmentation step")


SEG_MGD, SEG_CT = "seg R101->R18", "seg R18->R101"


def seg_kernel_targets() -> List[str]:
    return [f"MGD {SEG_MGD}: fwd+bwd >= 1.0x compiled", f"MGD {SEG_MGD}: peak memory <= 0.5x eager",
            f"MGD {SEG_MGD}: conv kernels >= 60% bf16 peak", f"CT {SEG_CT}: fwd+bwd >= 1.0x compiled"]


def seg_kernels(ctx) -> None:
    """The fused MGD and CT at the segmentation recipe's shapes (bench_mgd / bench_ct "seg" rows: the
    student's 512-channel layer4 -> the teacher's 2048 at 64x128, batch 8), as the kernels part does for
    classification and FPN shapes; dry: the tiny shapes under the same names."""
    from benchmarks import bench_ct, bench_mgd

    peaks = device_peaks(ctx.device)
    dtype, reps = torch.bfloat16, 1 if ctx.dry else 5
    mgd = next(iter(MGD_DRY.values())) if ctx.dry else bench_mgd.SHAPES[SEG_MGD]
    ct = next(iter(CT_DRY.values())) if ctx.dry else bench_ct.SHAPES[SEG_CT]
    _try(ctx, f"MGD {SEG_MGD}: benchmarked", lambda: _mgd_bench(ctx, SEG_MGD, mgd, dtype, peaks, reps))
    _try(ctx, f"CT {SEG_CT}: benchmarked", lambda: _ct_bench(ctx, SEG_CT, ct, dtype, peaks, reps))


def _dense_step(ctx, module, table: str) -> None:
    """A dense task's step rows (``module.measure``), each variant's rows recorded as soon as it is timed
    on the GPU (a part stopped later keeps them); the dry run: the tiny shape, one round, fp32."""
    from benchmarks import step_detection

    shape = "tiny" if ctx.dry else "gpu"
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cols = ["recipe", "step", "ms", "ms_p20_p80", "images_s", "student_over_this", "overhead", "teacher_share",
            "losses_share_of_step"]

    def record(rows):
        for row in rows:
            ctx.row(table, **{c: (round(v, 3) if isinstance(v, float) else v) for c, v in zip(cols, row)})

    variants = module.DEFAULT_VARIANTS[shape]

    def run() -> str:
        rows = module.measure(shape, variants, ctx.device, dtype, warmup=0 if ctx.dry else 2,
                              rep=1 if ctx.dry else 10, report=record)
        assert all(row[2] > 0 for row in rows), "a row without a time"
        return f"{len(rows)} rows, {rows[0][0]}"

    _try(ctx, f"{table}: {', '.join(variants)} ran and were timed", run)
    ctx.row(table, recipe="backend auto's MGD decisions", step=step_detection.auto_decisions())


PARTS: List[Part] = [
    Part("environment", environment, limit_s=15, dry_limit_s=300),
    Part("correctness", correctness, limit_s=115, dry_limit_s=300, env={"FASTKD_TRITON_TUNE": "few",
                                                                       "FASTKD_TRITON_TUNE_FEW": "1"}),
    Part("kernels", kernels, limit_s=160, dry_limit_s=300, targets=kernel_targets(),
         env={"FASTKD_TRITON_TUNE": "few", "FASTKD_TRITON_TUNE_FEW": "2"}),
    Part("step", training_step, limit_s=130, dry_limit_s=300, targets=step_targets(),
         env={"FASTKD_TRITON_TUNE": "few", "FASTKD_TRITON_TUNE_FEW": "2"}),
    Part("detection", detection_step, limit_s=230, dry_limit_s=300, window=2,
         env={"FASTKD_TRITON_TUNE": "few", "FASTKD_TRITON_TUNE_FEW": "2"}),
    Part("segmentation", segmentation_step, limit_s=170, dry_limit_s=300, window=2,
         env={"FASTKD_TRITON_TUNE": "few", "FASTKD_TRITON_TUNE_FEW": "2"}),
    # ~60-100 s on an H100/H200: 2 Inductor compiles of the references, ~10 Triton compiles, 5 repetitions
    Part("seg-kernels", seg_kernels, limit_s=120, dry_limit_s=300, window=2, targets=seg_kernel_targets(),
         env={"FASTKD_TRITON_TUNE": "few", "FASTKD_TRITON_TUNE_FEW": "2"}),
]
# The second device window: python benchmarks/gpu_check.py --parts environment,detection,segmentation,seg-kernels
WINDOW_2 = ["environment"] + [p.name for p in PARTS if p.window == 2]
