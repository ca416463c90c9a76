"""Accuracy of the float32 MGD paths on the CPU against the reference in float64, per tensor.

For the loss and every gradient: the L2-relative error ||got - ref|| / ||ref|| and the largest entry's
error relative to the largest entry max|got - ref| / max|ref|, for csrc with Winograd F(4x4,3x3)
convolutions, csrc with oneDNN's direct ones, and the reference itself in float32 (plain PyTorch's own
rounding, the yardstick). 'near kink' counts the generator's pre-activations within 1e-5 of zero (in
float64): a float32 forward error can flip those ReLU gates, which moves single gradient entries far
more than rounding does, so there only the L2 measure means something; the 'away' case puts every
pre-activation >= 0.3 from the kink (small W1, biases +-0.5), where the max-entry measure applies too.
tests/test_csrc_accuracy.py asserts these bounds at the two small shapes.

    python benchmarks/accuracy_cpu.py --out benchmarks/results/cpu.md
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, write_results  # noqa: E402
from fastkd.ops import _auto, mgd_loss  # noqa: E402
from fastkd.ops.mask import mgd_keep_mask  # noqa: E402

KW = dict(ratio=0.5, alpha=2e-5, seed=7)
# (name, mask, N, Cs, Ct, H=W, pre-activations away from the kink)
CASES = [
    ("he-init align 256->512 8x8", "spatial", 2, 256, 512, 8, False),
    ("away from kink 512 7x7", "channel", 2, 512, 512, 7, True),
    ("he-init align 512->2048 14x14", "channel", 2, 512, 2048, 14, False),
]
IMPLS = [("csrc winograd", "csrc", "winograd"), ("csrc direct", "csrc", "direct"),
         ("reference fp32", "reference", "winograd")]


def inputs(n, cs, ct, hw, away):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    s, t = r(n, cs, hw, hw), r(n, ct, hw, hw)
    if away:
        w1, b1 = r(ct, ct, 3, 3) * 2e-4, torch.sign(r(ct)) * 0.5
    else:
        w1, b1 = r(ct, ct, 3, 3) * (2 / (9 * ct)) ** 0.5, r(ct) * 0.01
    p = dict(gen_w1=w1, gen_b1=b1, gen_w2=r(ct, ct, 3, 3) * (1 / (9 * ct)) ** 0.5, gen_b2=r(ct) * 0.01)
    if cs != ct:
        p.update(align_w=r(ct, cs, 1, 1) * cs ** -0.5, align_b=r(ct) * 0.01)
    return s, t, p


def pre_activation(s, p, mask):
    a = s if "align_w" not in p else F.conv2d(s, p["align_w"], p["align_b"])
    n, c, h, w = a.shape
    keep = mgd_keep_mask(mask, n, c, h, w, ratio=KW["ratio"], seed=KW["seed"], dtype=a.dtype)
    return F.conv2d(a * keep, p["gen_w1"], p["gen_b1"], padding=1)


def loss_and_grads(s, t, p, mask, dtype, backend):
    s = s.to(dtype).requires_grad_()
    p = {k: v.to(dtype).requires_grad_() for k, v in p.items()}
    loss = mgd_loss(s, t.to(dtype), **p, mask=mask, **KW, backend=backend)
    grads = torch.autograd.grad(loss, [s, *p.values()])
    return dict(zip(["loss", "student", *p], [loss.double(), *(x.double() for x in grads)]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    ap.add_argument("--small", action="store_true", help="the two small cases only")
    args = ap.parse_args()
    tensors = ["loss", "student", "gen_w1", "gen_b1", "gen_w2", "gen_b2", "align_w"]
    columns = ["case", "impl", "near kink"] + [f"{t} L2 / max" for t in tensors]
    rows = []
    for name, mask, n, cs, ct, hw, away in CASES[:2] if args.small else CASES:
        s, t, p = inputs(n, cs, ct, hw, away)
        h = pre_activation(s, p, mask)
        near = f"{int((h.abs() < 1e-5).sum())} of {h.numel()} (min {h.abs().min().item():.1e})"
        want = loss_and_grads(s, t, p, mask, torch.float64, "reference")
        for label, backend, algo in IMPLS:
            os.environ["FASTKD_CSRC_MGD_ALGO"] = algo
            got = loss_and_grads(s, t, p, mask, torch.float32, backend)
            cells = []
            for k in tensors:
                if k not in want:
                    cells.append("-")
                    continue
                err, ref = got[k] - want[k], want[k]
                l2, worst = (err.norm() / ref.norm()).item(), (err.abs().max() / ref.abs().max()).item()
                cells.append(f"{l2:.1e} / {worst:.1e}")
            rows.append([f"{name} N{n} {mask} mask", label, near] + cells)
            print(" | ".join(rows[-1]), flush=True)
    if args.out:
        env = environment("cpu")
        model, vector = _auto._cpu_model()
        env["device"] = f"CPU {model} [{' '.join(vector)}] x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
        cmd = "python benchmarks/accuracy_cpu.py " + " ".join(sys.argv[1:])
        write_results(args.out, "CPU accuracy of the float32 MGD paths vs the float64 reference", columns, rows,
                      env, cmd, "Per tensor: L2-relative error / max-entry error relative to the largest "
                      "entry. 'near kink': pre-activations of the generator's ReLU within 1e-5 of zero.")


if __name__ == "__main__":
    main()
