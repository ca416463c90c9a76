"""Roofline of the fused losses: what the best possible kernel could reach, and what fusion can buy.

For each fused op at the recipes' shapes (bench_mgd / bench_ct SHAPES: ImageNet R34->R18 and R50->MBv1 at 7x7,
RetinaNet FPN P3-P7 at 1333x800, PSPNet 64x128), one training forward + backward:

  FLOPs          dense, of the matrix work (MGD: align + two 3x3 convolutions, backward 2x; CT: two GEMMs)
  compulsory     bytes no implementation can avoid when forward and backward are separate passes: each pass
                 reads S, T and the weights once, the backward writes dS and the weight gradients (nothing
                 kept in between: a recomputing kernel)
  fastkd         bytes the fused kernels' design moves (each tensor it reads or writes once per kernel:
                 MGD saves H1 and D, CT saves H and E; mgd_triton.py / ct_triton.py docstrings)
  eager          bytes the reference moves, measured: the reference (fastkd.ops.reference) runs forward and
                 backward on meta tensors under a dispatch mode that adds up every op's tensor inputs and
                 outputs (each op reads its inputs and writes its outputs once: cuDNN-like, no cache reuse);
                 "saved" is what autograd keeps for the backward (saved-tensor hooks, one count per storage)
  bound ms       max(FLOPs / peak, bytes / HBM bandwidth) on H100 SXM and A100 SXM 80GB, dense bf16 or TF32
  fusion x       eager bound / compulsory bound: the best speed-up over eager any fusion can give (1.0x for
                 a compute-bound op: fusion cannot beat the tensor cores' peak)

``lower_bound_ms(op, shape, dtype, device_name)`` gives gpu_check its "measured vs bound" column.

    python benchmarks/roofline.py            # writes benchmarks/results/roofline.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Dict, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Vendor datasheet figures, dense (no sparsity), SXM parts: TFLOP/s and TB/s.
DEVICES = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "hbm": 3.35},
    "A100 SXM 80GB": {"bf16": 312.0, "tf32": 156.0, "hbm": 2.039},
    "H200 SXM": {"bf16": 989.4, "tf32": 494.7, "hbm": 4.8},
}
REPORTED = ("H100 SXM", "A100 SXM 80GB")
# name -> (N, Cs, Ct, H, W, mask) / (N, Cs, Ch, Ct, H, W): the benchmarks' shapes (gpu_check times the same)
MGD_SHAPES = {"cls R34->R18": (256, 512, 512, 7, 7, "channel"), "cls R50->MBv1": (256, 1024, 2048, 7, 7, "channel"),
              "det FPN P3": (16, 256, 256, 100, 168, "spatial"), "det FPN P4": (16, 256, 256, 50, 84, "spatial"),
              "det FPN P5": (16, 256, 256, 25, 42, "spatial"), "det FPN P6": (16, 256, 256, 13, 21, "spatial"),
              "det FPN P7": (16, 256, 256, 7, 11, "spatial"), "seg R101->R18": (8, 512, 2048, 64, 128, "spatial")}
CT_SHAPES = {"cls R50->MBv1": (256, 1024, 2048, 2048, 7, 7), "cls R34->R18": (256, 512, 512, 512, 7, 7),
             "det FPN P3": (16, 256, 256, 256, 100, 168), "det FPN P4": (16, 256, 256, 256, 50, 84),
             "det FPN P5": (16, 256, 256, 256, 25, 42), "det FPN P6": (16, 256, 256, 256, 13, 21),
             "det FPN P7": (16, 256, 256, 256, 7, 11), "seg R18->R101": (8, 512, 2048, 2048, 64, 128)}


def device_key(name: str) -> Optional[str]:
    """The DEVICES entry of a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3' -> 'H100 SXM'), or None."""
    for key in DEVICES:
        if key.split()[0] in name:
            return key
    return None


def work(op: str, shape, elt: int) -> Dict[str, float]:
    """FLOPs and bytes (compulsory, fastkd's design) of one forward + backward."""
    if op == "mgd":
        n, cs, ct, h, w = shape[:5]
        p, align = n * h * w, cs != ct
        weights = (2 * 9 * ct * ct + (cs * ct if align else 0)) * elt
        flops = 3 * 2 * p * (2 * 9 * ct * ct + (cs * ct if align else 0))
        # forward: A (or S) -> H1, H1 + T -> D (5); backward: wgrad2 (H1, D), dgrad2 (D, H1 -> dH), wgrad1
        # (A, dH), dgrad1 (dH -> dA or dS) (9); align: S -> A, dS = dA Wa (dA -> dS), wgrad (S, dA) (3 Cs + 3 Ct)
        design = p * ((14 + (3 if align else 0)) * ct + (3 * cs if align else 0)) * elt + 3 * weights
    else:
        n, cs, ch, ct, h, w = shape
        p = n * h * w
        weights = (cs * ch + ch * ct) * elt
        flops = 3 * 2 * p * (cs * ch + ch * ct)
        design = p * (cs + 2 * ch + 2 * ct + 2 * ct + 5 * ch + 2 * cs) * elt + 3 * weights  # bench_ct.work
    compulsory = (2 * p * (cs + ct) + p * cs) * elt + 3 * weights
    return {"flops": float(flops), "compulsory": float(compulsory), "design": float(design)}


def bound_ms(flops: float, nbytes: float, device: str, dtype: torch.dtype) -> float:
    d = DEVICES[device]
    peak = d["tf32"] if dtype == torch.float32 else d["bf16"]
    return max(flops / (peak * 1e12), nbytes / (d["hbm"] * 1e12)) * 1e3


def lower_bound_ms(op: str, shape, dtype: torch.dtype, device_name: str) -> Optional[float]:
    """The compulsory-traffic roofline bound of one forward + backward on a CUDA device (None if unknown)."""
    key = device_key(device_name)
    if key is None:
        return None
    w = work(op, shape, torch.empty((), dtype=dtype).element_size())
    return bound_ms(w["flops"], w["compulsory"], key, dtype)


# ----------------------------------------------------------------------------------- eager, measured

class _Traffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Adds up the bytes of every op's tensor inputs and outputs (views move nothing)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def eager_traffic(op: str, shape, dtype: torch.dtype) -> Tuple[float, float]:
    """(bytes moved by the reference's forward + backward, bytes it saves for the backward), on meta tensors."""
    from fastkd.ops import reference

    dev = "meta"
    e = lambda *s: torch.empty(*s, device=dev, dtype=dtype, requires_grad=True)  # noqa: E731
    if op == "mgd":
        n, cs, ct, h, w, mask = shape
        s, t = e(n, cs, h, w), torch.empty(n, ct, h, w, device=dev, dtype=dtype)
        params = [e(ct, ct, 3, 3), e(ct), e(ct, ct, 3, 3), e(ct)]
        kw = dict(align_w=e(ct, cs, 1, 1), align_b=e(ct)) if cs != ct else {}
        fn = lambda: reference.mgd_loss(s, t, *params, mask=mask, ratio=0.5, alpha=1e-5, seed=1, **kw)  # noqa: E731
    else:
        n, cs, ch, ct, h, w = shape
        s, t = e(n, cs, h, w), torch.empty(n, ct, h, w, device=dev, dtype=dtype)
        params = [e(ch, cs, 1, 1), e(ch), e(ct, ch, 1, 1), e(ct)]
        fn = lambda: reference.ct_loss(s, t, *params, alpha=1e-5)  # noqa: E731
    saved: Dict[int, int] = {}

    def pack(x):
        saved[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
        return x

    with _Traffic() as traffic:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn()
        loss.backward()
    return float(traffic.bytes), float(sum(saved.values()))


# ----------------------------------------------------------------------------------------------- table

COLUMNS = ["op", "shape", "dims", "dtype", "GFLOP", "compulsory MB", "fastkd MB", "eager MB", "eager saved MB"] + [
    f"{d}: {c}" for d in REPORTED for c in ("bound ms", "bound by", "fastkd bound ms", "eager bound ms", "fusion x")]


def rows(dtypes=(torch.bfloat16, torch.float32)):
    out = []
    for dtype in dtypes:
        for op, shapes in (("mgd", MGD_SHAPES), ("ct", CT_SHAPES)):
            for name, shape in shapes.items():
                w = work(op, shape, torch.empty((), dtype=dtype).element_size())
                eager, saved = eager_traffic(op, shape, dtype)
                dims = " ".join(str(v) for v in shape)
                row = [op.upper(), name, dims, "bf16" if dtype == torch.bfloat16 else "fp32 (TF32)",
                       w["flops"] / 1e9, w["compulsory"] / 1e6, w["design"] / 1e6, eager / 1e6, saved / 1e6]
                for d in REPORTED:
                    lb = bound_ms(w["flops"], w["compulsory"], d, dtype)
                    by = "FLOPs" if lb == bound_ms(w["flops"], 0.0, d, dtype) else "bytes"
                    row += [lb, by, bound_ms(w["flops"], w["design"], d, dtype), bound_ms(w["flops"], eager, d, dtype),
                            f"{bound_ms(w['flops'], eager, d, dtype) / lb:.2f}x"]
                out.append(row)
    return out


def main(argv=None) -> int:
    from benchmarks.common import markdown_table

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "roofline.md"), help="'-': print only")
    args = p.parse_args(argv)
    peaks = "; ".join(f"{k}: bf16 {v['bf16']} / TF32 {v['tf32']} TFLOP/s, HBM {v['hbm']} TB/s"
                      for k, v in DEVICES.items() if k in REPORTED)
    what = "\n\n".join(__doc__.split("\n\n")[1:3])  # the shapes and the columns
    text = (f"# Roofline of the fused losses\n\n{what}\n\n"
            f"Date {datetime.date.today().isoformat()}, torch {torch.__version__} (eager traffic on meta tensors). "
            f"Peaks (dense, datasheet): {peaks}.\n\nCommand: `python benchmarks/roofline.py`\n\n"
            f"{markdown_table(COLUMNS, rows())}\n")
    print(text)
    if args.out != "-":
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
