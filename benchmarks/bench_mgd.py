"""MGD loss: fused Triton kernels vs reference eager vs torch.compile(reference), same run.

For every shape of the MGD issue (bf16, channels_last by default) and every implementation it times the
training forward (inputs require grad, so the fused path also writes dL/dG), the backward alone (graph
retained, the backward re-run) and forward+backward, and measures the peak extra memory of one
forward+backward. Reported per row: median ms (20/80 % quantiles), speed-up over eager and over
compiled, TFLOP/s and its fraction of the device's dense bf16 peak. On CUDA one more row per shape
("conv kernels") profiles a fused forward+backward and divides the convolution FLOPs by the time of
the fused convolution kernels alone (the issue's "generator convolutions at >= 60 % of peak").

FLOPs (dense; dropped pixels/channels still go through the MACs): forward 2*P*(9*2*Ct*Ct + Cs*Ct)
with P = N*H*W (the Cs*Ct term only with align), backward twice the forward.

  GPU, all shapes:  python benchmarks/bench_mgd.py --out auto
  GPU, quick:       python benchmarks/bench_mgd.py --quick --out auto
  CPU smoke (no CUDA: kernels under TRITON_INTERPRET=1, tiny shapes):
                    python benchmarks/bench_mgd.py --device cpu --tiny --no-compile --out /tmp/mgd_cpu.md
  (torch.compile of the reference on a 2-core CPU takes many minutes: skip it there)
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():  # kernels run in the interpreter; must be set before triton loads them
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import (bench, device_peaks, environment, peak_memory_bytes,  # noqa: E402
                               report_kernel_run)
from fastkd.ops import mgd_loss, reference  # noqa: E402

# name -> (N, Cs, Ct, H, W, mask, ratio, alpha)   (METHODS.md: official MGD settings per task)
SHAPES = {
    "cls R34->R18": (256, 512, 512, 7, 7, "channel", 0.15, 7e-5),
    "cls R50->MBv1": (256, 1024, 2048, 7, 7, "channel", 0.15, 7e-5),
    "det FPN P3": (16, 256, 256, 100, 168, "spatial", 0.65, 2e-5),
    "det FPN P4": (16, 256, 256, 50, 84, "spatial", 0.65, 2e-5),
    "det FPN P5": (16, 256, 256, 25, 42, "spatial", 0.65, 2e-5),
    "det FPN P6": (16, 256, 256, 13, 21, "spatial", 0.65, 2e-5),
    "det FPN P7": (16, 256, 256, 7, 11, "spatial", 0.65, 2e-5),
    "seg R101->R18": (8, 512, 2048, 64, 128, "spatial", 0.75, 2e-5),
}
QUICK = ("cls R34->R18", "det FPN P3", "det FPN P5")
TINY_SHAPES = {"tiny spatial align": (2, 24, 16, 7, 7, "spatial", 0.65, 2e-5),
               "tiny channel": (2, 32, 32, 5, 9, "channel", 0.15, 7e-5)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEED = 1234


def flops(n, cs, ct, h, w):
    """(forward, backward) dense FLOPs of align + the two 3x3 generator convolutions."""
    p = n * h * w
    fwd = 2 * p * (2 * 9 * ct * ct + (cs * ct if cs != ct else 0))
    return fwd, 2 * fwd


def make(shape, dtype, device, channels_last):
    n, cs, ct, h, w = shape[:5]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    s, t = rnd(n, cs, h, w), rnd(n, ct, h, w)
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    params = [rnd(ct, ct, 3, 3, scale=(9 * ct) ** -0.5), rnd(ct, scale=0.1), rnd(ct, ct, 3, 3, scale=(9 * ct) ** -0.5),
              rnd(ct, scale=0.1)]
    if cs != ct:
        params += [rnd(ct, cs, 1, 1, scale=cs ** -0.5), rnd(ct, scale=0.1)]
    return s.requires_grad_(), t, [p.requires_grad_() for p in params]


def loss_fn(backend, mask, ratio, alpha):
    def fn(s, t, w1, b1, w2, b2, aw=None, ab=None):
        if backend == "reference":
            return reference.mgd_loss(s, t, w1, b1, w2, b2, align_w=aw, align_b=ab, mask=mask, ratio=ratio,
                                      alpha=alpha, seed=SEED)
        return mgd_loss(s, t, w1, b1, w2, b2, align_w=aw, align_b=ab, mask=mask, ratio=ratio, alpha=alpha,
                        seed=SEED, backend=backend)
    return fn


def measure(fn, s, t, params, device, reps):
    leaves = [s, *params]

    def clear():
        for x in leaves:
            x.grad = None

    def full():
        clear()
        fn(s, t, *params).backward()

    loss = fn(s, t, *params)
    loss.backward(retain_graph=True)
    timings = {"backward": bench(lambda: loss.backward(retain_graph=True), device, warmup=1, rep=reps)}
    del loss
    clear()
    timings["forward"] = bench(lambda: fn(s, t, *params), device, warmup=1, rep=reps)
    timings["full"] = bench(full, device, warmup=1, rep=reps)
    clear()
    timings["peak"] = peak_memory_bytes(full, device)
    clear()
    return timings


def conv_kernel_time_ms(fn, s, t, params):
    """CUDA time of the fused convolution kernels in one forward+backward (and of everything else)."""
    from torch.profiler import ProfilerActivity, profile

    fn(s, t, *params).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn(s, t, *params).backward()
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.device_time / 3 / 1e3
    conv = sum(v for k, v in per_kernel.items() if "_conv_fwd_kernel" in k or "_conv_wgrad_kernel" in k)
    return conv, sum(per_kernel.values()) - conv


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test under the interpreter)")
    p.add_argument("--shapes", default=None, help="comma-separated substrings of shape names to keep")
    p.add_argument("--nchw", action="store_true", help="NCHW-contiguous features (default channels_last)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--reps", type=int, default=10, help="CPU repetitions (the GPU uses do_bench)")
    p.add_argument("--out", default=None, help="append the table to this file; 'auto': results/mgd_<device>.md")
    args = p.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.quick and not args.tiny:
        shapes = {k: v for k, v in shapes.items() if k in QUICK}
    if args.shapes:
        keep = [k.strip().lower() for k in args.shapes.split(",")]
        shapes = {k: v for k, v in shapes.items() if any(x in k.lower() for x in keep)}
    env = environment(device)
    peaks = device_peaks(device)
    columns = ["shape", "N Cs>Ct HxW mask", "impl", "pass", "ms", "p20-p80", "vs eager", "vs compiled", "TFLOP/s",
               "% bf16 peak", "peak extra MiB", "mem vs eager"]
    rows = []
    for name, shape in shapes.items():
        n, cs, ct, h, w, mask, ratio, alpha = shape
        s, t, params = make(shape, dtype, device, channels_last=not args.nchw)
        with torch.no_grad():
            ref = reference.mgd_loss(s, t, *params[:4], align_w=params[4] if cs != ct else None,
                                     align_b=params[5] if cs != ct else None, mask=mask, ratio=ratio, alpha=alpha,
                                     seed=SEED, upcast=True).item()
            got = loss_fn("triton", mask, ratio, alpha)(s, t, *params).item()
        print(f"{name}: fused loss {got:.6g}, fp32 reference {ref:.6g} (rel. diff {abs(got - ref) / abs(ref):.1e})")
        impls = {"fused triton": loss_fn("triton", mask, ratio, alpha),
                 "eager reference": loss_fn("reference", mask, ratio, alpha)}
        if not args.no_compile:  # one compilation serves all passes (donated buffers off: backward re-runs)
            impls["compiled reference"] = torch.compile(loss_fn("reference", mask, ratio, alpha), dynamic=False)
        results = {}
        with torch._functorch.config.patch(donated_buffer=False):
            for impl, fn in impls.items():
                try:
                    results[impl] = measure(fn, s, t, params, device, args.reps)
                except Exception as exc:  # e.g. torch.compile without a working compiler: report, go on
                    print(f"  {impl}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        fl_f, fl_b = flops(n, cs, ct, h, w)
        per_pass = {"forward": fl_f, "backward": fl_b, "full": fl_f + fl_b}
        label = f"{n} {cs}>{ct} {h}x{w} {mask}"
        pct = lambda tf: f"{100 * tf / peaks['bf16_tflops']:.1f}" if peaks else "-"  # noqa: E731
        for impl, res in results.items():
            for pas, fl in per_pass.items():
                ms = res[pas]["ms"]
                ratio_to = lambda o: f"{results[o][pas]['ms'] / ms:.2f}x" if o in results else "-"  # noqa: E731
                peak_mem = res["peak"] if pas == "full" else None
                eager_mem = results.get("eager reference", {}).get("peak") if pas == "full" else None
                rows.append([name, label, impl, pas, ms, f"{res[pas]['p20']:.3g}-{res[pas]['p80']:.3g}",
                             ratio_to("eager reference"), ratio_to("compiled reference"), fl / ms / 1e9,
                             pct(fl / ms / 1e9), f"{peak_mem / 2**20:.4g}" if peak_mem is not None else "-",
                             f"{peak_mem / eager_mem:.2f}" if peak_mem and eager_mem else "-"])
                print("  " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in rows[-1][2:]))
        if device.type == "cuda" and "fused triton" in results:
            conv_ms, other_ms = conv_kernel_time_ms(impls["fused triton"], s, t, params)
            tf = (fl_f + fl_b) / conv_ms / 1e9
            rows.append([name, label, "fused: conv kernels only", "full", conv_ms, f"other kernels {other_ms:.3g} ms",
                         "-", "-", tf, pct(tf), "-", "-"])
            print("  " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in rows[-1][2:]))
        del s, t, params, results, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.out:
        notes = ("Forward = training forward (inputs require grad); backward = backward alone (graph retained); "
                 "full = both. TFLOP/s = dense FLOPs of align + both 3x3 convolutions (backward = 2x forward) / time. "
                 "Peak extra memory of one forward+backward beyond the inputs. 'conv kernels only' = the same FLOPs "
                 "over the CUDA time of the fused convolution kernels (profiler), the rest listed as other kernels.")
        print(report_kernel_run("mgd", "MGD", device, args.out, args, columns, rows, env, notes))


if __name__ == "__main__":
    main()
