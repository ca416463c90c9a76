"""CT loss: fused Triton kernels vs reference eager vs torch.compile(reference), same run.

For every shape of the CT issue (bf16 by default) and every implementation it times the training
forward (inputs require grad, so the fused path also produces dL/dY), the backward alone (graph
retained, the backward re-run) and forward+backward, and measures the peak extra memory of one
forward+backward. Reported per row: median ms (20/80 % quantiles), speed-up over eager and over
compiled, TFLOP/s and bandwidth with their fraction of the device's peaks.

FLOPs: forward 2*M*(Cs*Ch + Ch*Ct), backward twice that (M = N*H*W). Bytes: what the fused design
must move (forward: S, H written and read, T, dY written; backward: dY twice, H twice, dP written and
read twice, S, dS written); the same byte count divides every implementation's time, so the GB/s
column is an effective bandwidth (for eager/compiled it is work done per second, not their traffic).
The "min" column is the time the unavoidable traffic (read S and T, write dS) takes at the HBM peak.

  GPU:  python benchmarks/bench_ct.py --device cuda --out auto
  CPU smoke (no CUDA: kernels under TRITON_INTERPRET=1, tiny shapes):
        python benchmarks/bench_ct.py --device cpu --tiny --out auto
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():  # kernels run in the interpreter; must be set before triton loads them
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import (bench, device_peaks, environment, peak_memory_bytes,  # noqa: E402
                               report_kernel_run)
from fastkd.ops import ct_loss, reference  # noqa: E402

# name -> (N, Cs, Ch, Ct, H, W); Ch = Ct (METHODS.md default).
SHAPES = {
    "cls R50->MBv1": (256, 1024, 2048, 2048, 7, 7),
    "cls R34->R18": (256, 512, 512, 512, 7, 7),
    "det FPN P3": (16, 256, 256, 256, 100, 168),
    "det FPN P4": (16, 256, 256, 256, 50, 84),
    "det FPN P5": (16, 256, 256, 256, 25, 42),
    "det FPN P6": (16, 256, 256, 256, 13, 21),
    "det FPN P7": (16, 256, 256, 256, 7, 11),
    "seg R18->R101": (8, 512, 2048, 2048, 64, 128),
}
TINY_SHAPES = {"tiny odd": (2, 12, 20, 24, 5, 7), "tiny 32": (2, 32, 32, 32, 8, 8)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def work(n, cs, ch, ct, h, w, elt):
    """(flops fwd, flops bwd, bytes fwd, bytes bwd, unavoidable bytes) of the fused design."""
    m = n * h * w
    flops_fwd = 2 * m * (cs * ch + ch * ct)
    bytes_fwd = m * (cs + 2 * ch + 2 * ct) * elt
    bytes_bwd = m * (2 * ct + 5 * ch + 2 * cs) * elt
    return flops_fwd, 2 * flops_fwd, bytes_fwd, bytes_bwd, m * (2 * cs + ct) * elt


def make(shape, dtype, device, channels_last):
    n, cs, ch, ct, h, w = shape
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    s, t = rnd(n, cs, h, w), rnd(n, ct, h, w)
    if channels_last:
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    params = [rnd(ch, cs, 1, 1, scale=cs ** -0.5), rnd(ch, scale=0.1), rnd(ct, ch, 1, 1, scale=ch ** -0.5),
              rnd(ct, scale=0.1)]
    return s.requires_grad_(), t, [p.requires_grad_() for p in params]


def fused(s, t, *p):
    return ct_loss(s, t, *p, alpha=2e-5, backend="triton")


def eager(s, t, *p):
    return reference.ct_loss(s, t, *p, alpha=2e-5)


# name -> factory of the function to time.
IMPLEMENTATIONS = {"fused triton": lambda: fused, "eager reference": lambda: eager,
                   "compiled reference": lambda: torch.compile(eager)}


def measure(make_fn, s, t, params, device, reps):
    leaves = [s, *params]

    def clear():
        for x in leaves:
            x.grad = None

    fn = make_fn()
    loss = fn(s, t, *params)
    loss.backward(retain_graph=True)  # backward alone: the graph is kept and its backward re-run
    timings = {"backward": bench(lambda: loss.backward(retain_graph=True), device, warmup=1, rep=reps)}
    del loss
    clear()

    def full():
        clear()
        fn(s, t, *params).backward()

    timings["forward"] = bench(lambda: fn(s, t, *params), device, warmup=1, rep=reps)
    timings["full"] = bench(full, device, warmup=1, rep=reps)
    clear()
    timings["peak"] = peak_memory_bytes(full, device)
    clear()
    return timings


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test under the interpreter)")
    p.add_argument("--shapes", default=None, help="comma-separated substrings of shape names to keep")
    p.add_argument("--nchw", action="store_true", help="NCHW-contiguous features (default channels_last)")
    p.add_argument("--reps", type=int, default=10, help="CPU repetitions (the GPU uses do_bench)")
    p.add_argument("--out", default=None, help="append the table to this file; 'auto': results/ct_<device>.md")
    args = p.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        keep = [k.strip().lower() for k in args.shapes.split(",")]
        shapes = {k: v for k, v in shapes.items() if any(x in k.lower() for x in keep)}
    env = environment(device)
    peaks = device_peaks(device)
    columns = ["shape", "N Cs>Ch>Ct HxW", "impl", "pass", "ms", "p20-p80", "vs eager", "vs compiled", "TFLOP/s",
               "% bf16 peak", "GB/s", "% HBM", "min ms", "peak extra MiB", "mem vs eager"]
    rows = []
    for name, shape in shapes.items():
        s, t, params = make(shape, dtype, device, channels_last=not args.nchw)
        ref = reference.ct_loss(s, t, *params, alpha=2e-5, upcast=True).item()
        got = ct_loss(s, t, *params, alpha=2e-5, backend="triton").item()
        print(f"{name}: fused loss {got:.6g}, fp32 reference {ref:.6g} (rel. diff {abs(got - ref) / abs(ref):.1e})")
        results = {}
        for impl, make_fn in IMPLEMENTATIONS.items():
            try:  # a compiled backward can be re-run (retain_graph) only without donated buffers
                with torch._functorch.config.patch(donated_buffer=False):
                    results[impl] = measure(make_fn, s, t, params, device, args.reps)
            except Exception as exc:  # e.g. torch.compile without a working compiler: report, go on
                print(f"  {impl}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        fl_f, fl_b, by_f, by_b, by_min = work(*shape, s.element_size())
        per_pass = {"forward": (fl_f, by_f), "backward": (fl_b, by_b), "full": (fl_f + fl_b, by_f + by_b)}
        n, cs, ch, ct, h, w = shape
        for impl, res in results.items():
            for pas, (flops, nbytes) in per_pass.items():
                ms = res[pas]["ms"]

                def ratio(other):
                    return f"{results[other][pas]['ms'] / ms:.2f}x" if other in results else "-"

                tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
                peak_mem = res["peak"] if pas == "full" else None
                eager_mem = results.get("eager reference", {}).get("peak") if pas == "full" else None
                rows.append([
                    name, f"{n} {cs}>{ch}>{ct} {h}x{w}", impl, pas, ms, f"{res[pas]['p20']:.3g}-{res[pas]['p80']:.3g}",
                    ratio("eager reference"), ratio("compiled reference"), tflops,
                    f"{100 * tflops / peaks['bf16_tflops']:.1f}" if peaks else "-", gbps,
                    f"{100 * gbps / 1e3 / peaks['hbm_tbps']:.1f}" if peaks else "-",
                    f"{by_min / peaks['hbm_tbps'] / 1e9:.3g}" if peaks and pas == "full" else "-",
                    f"{peak_mem / 2**20:.3g}" if peak_mem is not None else "-",
                    f"{peak_mem / eager_mem:.2f}" if peak_mem and eager_mem else "-"])
                print("  " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in rows[-1][2:]))
        del s, t, params, results
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.out:
        notes = ("Forward = training forward (inputs require grad); backward = backward alone (graph retained); "
                 "full = both. GB/s = bytes the fused design moves / time (same bytes for every impl). "
                 "min ms = unavoidable traffic (read S, T; write dS) at the HBM peak. Peak extra memory of one "
                 "forward+backward beyond the inputs. torch.compile runs without donated buffers (so that "
                 "its backward can be re-run for the backward-alone timing).")
        print(report_kernel_run("ct", "CT", device, args.out, args, columns, rows, env, notes))


if __name__ == "__main__":
    main()
