"""MGD and CT losses on the CPU: csrc (fastkd._C) vs reference eager vs torch.compile(reference).

Float32, inputs that require grad (training). MGD's csrc kernels run the generator's 3x3
convolutions by Winograd F(4x4, 3x3) (csrc/winograd.cpp); the 'csrc (direct conv)' row is the same
kernels with oneDNN's direct convolutions (FASTKD_CSRC_MGD_ALGO=direct), to show what each part gives. Per case and implementation: the forward, the backward
alone (a fresh forward before each, untimed) and forward+backward (``torch.autograd.grad`` of the
loss w.r.t. the student and every parameter), median ms with 20/80 % quantiles, and the peak extra
memory of one forward+backward (``benchmarks.common.peak_memory_bytes``: every ATen CPU allocation
replayed in order). The three implementations are timed round-robin, one repetition each per round,
so that load from other processes on a shared machine falls on all of them alike (the order rotates each
round, so none always follows the same other one).

Shapes. Demo: Fashion-MNIST students at 28x28 input whose last stage is 7x7, batch 128, teacher
features of 128 channels (MGD channel mask, as METHODS.md uses for classification), and a narrower
student (64 -> 128 channels, align layer). Mid: N=32, C=64, 14x14 (MGD spatial mask). The ImageNet
recipes' own shapes (issue 15): ResNet-34 -> ResNet-18 [8,512,7,7] and ResNet-50 -> MobileNetV1
[8,1024->2048,7,7] (channel mask), and a detection FPN level [2,256,64,64] (spatial mask); fewer
rounds there (seconds per call).

The 'auto' row is ``backend="auto"`` as a user gets it: the measured choice (fastkd/ops/_auto.py),
made during its warm-up by a trial in this run (a fresh temporary cache directory, so no decision from
an earlier run is reused); the 'auto chose' column names the backend and the trial's own timings. It
must be within 5 % of the fastest backend auto can choose from (csrc, eager = the reference) at every
shape: column 'auto ok'.

torch.compile(reference.mgd_loss) does not finish compiling on torch 2.13 CPU (inductor's lowering
recurses through the 10 inlined Philox rounds of the mask, > 7 min at N=4, C=8 without an end in
sight), so the compiled MGD baseline draws the keep-mask with the reference's own function, eagerly,
and compiles the rest of the reference (``_mgd_from_keep``, checked equal to reference.mgd_loss).

    python benchmarks/bench_cpu.py --out benchmarks/results/cpu.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, peak_memory_bytes, write_results  # noqa: E402
from fastkd.ops import _auto, ct_loss, explain, mgd_loss, reference  # noqa: E402
from fastkd.ops.mask import mgd_keep_mask  # noqa: E402
from fastkd.testing import assert_close_scaled  # noqa: E402


@dataclass
class Case:
    op: str
    name: str
    n: int
    cs: int
    ct: int
    h: int
    w: int
    mask: str = "channel"
    rounds: int = 0  # 0: --rounds; else at most this many (slow shapes)

    def flops_fwd(self) -> float:
        m = self.n * self.h * self.w
        if self.op == "mgd":
            align = 2 * m * self.cs * self.ct if self.cs != self.ct else 0
            return align + 2 * 2 * m * self.ct * self.ct * 9
        return 2 * m * (self.cs * self.ct + self.ct * self.ct)  # CT hidden width = Ct


CASES = [
    Case("mgd", "demo 7x7 N128 C128", 128, 128, 128, 7, 7, "channel"),
    Case("mgd", "demo 7x7 N128 C64->128 (align)", 128, 64, 128, 7, 7, "channel"),
    Case("mgd", "mid 14x14 N32 C64", 32, 64, 64, 14, 14, "spatial"),
    Case("mgd", "cls R34->R18 7x7 N8 C512", 8, 512, 512, 7, 7, "channel", rounds=7),
    Case("mgd", "cls R50->MBv1 7x7 N8 C1024->2048 (align)", 8, 1024, 2048, 7, 7, "channel", rounds=5),
    Case("mgd", "det FPN 64x64 N2 C256", 2, 256, 256, 64, 64, "spatial", rounds=5),
    Case("ct", "demo 7x7 N128 C128", 128, 128, 128, 7, 7),
    Case("ct", "demo 7x7 N128 C256", 128, 256, 256, 7, 7),
    Case("ct", "mid 14x14 N32 C64", 32, 64, 64, 14, 14),
]
SEED = 1234


def make_inputs(case: Case):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).requires_grad_()  # noqa: E731
    student = rnd(case.n, case.cs, case.h, case.w)
    teacher = torch.randn(case.n, case.ct, case.h, case.w, generator=g)
    if case.op == "mgd":
        params = dict(gen_w1=rnd(case.ct, case.ct, 3, 3, scale=0.03), gen_b1=rnd(case.ct, scale=0.1),
                      gen_w2=rnd(case.ct, case.ct, 3, 3, scale=0.03), gen_b2=rnd(case.ct, scale=0.1))
        if case.cs != case.ct:
            params.update(align_w=rnd(case.ct, case.cs, 1, 1, scale=0.1), align_b=rnd(case.ct, scale=0.1))
    else:
        params = dict(w1=rnd(case.ct, case.cs, scale=0.1), b1=rnd(case.ct, scale=0.1),
                      w2=rnd(case.ct, case.ct, scale=0.1), b2=rnd(case.ct, scale=0.1))
    return student, teacher, params


def _mgd_from_keep(student, teacher, keep, w1, b1, w2, b2, align_w, align_b, alpha: float):
    """reference.mgd_loss given its keep-mask (what torch.compile can compile; see the module doc)."""
    a = student if align_w is None else F.conv2d(student, align_w, align_b)
    g = F.conv2d(F.relu(F.conv2d(a * keep, w1, b1, padding=1)), w2, b2, padding=1)
    return alpha * (g - teacher).pow(2).sum() / student.shape[0]


def implementations(case: Case, student, teacher, params):
    if case.op == "mgd":
        kw = dict(mask=case.mask, ratio=0.15 if case.mask == "channel" else 0.65, alpha=2e-5, seed=SEED)
        p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
        aw, ab = params.get("align_w"), params.get("align_b")
        compiled = torch.compile(_mgd_from_keep, dynamic=False)

        def compiled_mgd():
            keep = mgd_keep_mask(case.mask, case.n, case.ct, case.h, case.w, ratio=kw["ratio"], seed=SEED)
            return compiled(student, teacher, keep, *p, aw, ab, kw["alpha"])

        with torch.no_grad():  # the compiled baseline computes the reference's loss
            want = reference.mgd_loss(student, teacher, *p, align_w=aw, align_b=ab, **kw)
            assert_close_scaled(_mgd_from_keep(student, teacher, mgd_keep_mask(
                case.mask, case.n, case.ct, case.h, case.w, ratio=kw["ratio"], seed=SEED), *p, aw, ab,
                kw["alpha"]), want, torch.float32, name="compile baseline")
        kw.update(align_w=aw, align_b=ab)

        def csrc_direct():  # the csrc kernels with oneDNN's direct convolutions instead of Winograd
            before = os.environ.get("FASTKD_CSRC_MGD_ALGO")
            os.environ["FASTKD_CSRC_MGD_ALGO"] = "direct"
            try:
                return mgd_loss(student, teacher, *p, backend="csrc", **kw)
            finally:
                if before is None:
                    del os.environ["FASTKD_CSRC_MGD_ALGO"]
                else:
                    os.environ["FASTKD_CSRC_MGD_ALGO"] = before

        return {
            "csrc": lambda: mgd_loss(student, teacher, *p, backend="csrc", **kw),
            "csrc (direct conv)": csrc_direct,
            "eager": lambda: mgd_loss(student, teacher, *p, backend="reference", **kw),
            "compile": compiled_mgd,
            "auto": lambda: mgd_loss(student, teacher, *p, backend="auto", **kw),
        }
    p = [params[k] for k in ("w1", "b1", "w2", "b2")]
    compiled = torch.compile(reference.ct_loss, dynamic=False)
    return {
        "csrc": lambda: ct_loss(student, teacher, *p, alpha=1e-3, backend="csrc"),
        "eager": lambda: ct_loss(student, teacher, *p, alpha=1e-3, backend="reference"),
        "compile": lambda: compiled(student, teacher, *p, alpha=1e-3),
        "auto": lambda: ct_loss(student, teacher, *p, alpha=1e-3, backend="auto"),
    }


def auto_choice(case: Case, student, teacher, params) -> str:
    """What ``auto`` chose for this case and the trial's timings, from ``explain``."""
    op = "mgd_loss" if case.op == "mgd" else "ct_loss"
    inputs = dict(student=student, teacher=teacher, w1=params.get("w1"), w2=params.get("w2"))
    if case.op == "mgd":
        inputs = dict(student=student, teacher=teacher, gen_w1=params["gen_w1"], align_w=params.get("align_w"),
                      mask=case.mask)
    report = explain(op, "cpu", **inputs)
    trial = ", ".join(f"{k} {v:.1f}" for k, v in report.ms.items())
    return f"{report.choice} ({report.how}{': ' + trial + ' ms' if trial else ''})"


def stats(times):
    times = sorted(times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def run_case(case: Case, rounds: int, only_impls=None, warmup: int = 3, sample_ms: float = 100.0):
    rounds = min(rounds, case.rounds) if case.rounds else rounds
    student, teacher, params = make_inputs(case)
    wrt = [student] + [t for t in params.values() if t is not None]
    impls = implementations(case, student, teacher, params)
    if only_impls:  # csrc, eager and auto always (the columns compare against them)
        impls = {k: v for k, v in impls.items() if k in set(only_impls) | {"csrc", "eager", "auto"}}
    for name, fn in impls.items():  # warm up (compiles the torch.compile variants: forward and backward)
        t0 = time.perf_counter()
        for _ in range(warmup if name != "compile" else max(warmup, 2)):
            torch.autograd.grad(fn(), wrt)
        print(f"# {case.op} {case.name}: {name} warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    # one forward+backward sample = the mean of `reps` back-to-back calls, reps chosen (the same for every
    # implementation) so that a sample lasts about sample_ms: short ops are not at the mercy of one timer tick
    # or one preemption
    t0 = time.perf_counter()
    torch.autograd.grad(impls["eager"](), wrt)
    reps = max(1, round(sample_ms / max((time.perf_counter() - t0) * 1e3, 1e-3)))
    times = {k: {"fwd": [], "bwd": [], "full": []} for k in impls}
    names = list(impls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no implementation always
            fn = impls[name]                                          # runs right after the same other one
            t0 = time.perf_counter()
            loss = fn()
            t1 = time.perf_counter()
            torch.autograd.grad(loss, wrt)
            t2 = time.perf_counter()
            for _ in range(reps):
                torch.autograd.grad(fn(), wrt)
            t3 = time.perf_counter()
            times[name]["fwd"].append((t1 - t0) * 1e3)
            times[name]["bwd"].append((t2 - t1) * 1e3)
            times[name]["full"].append((t3 - t2) * 1e3 / reps)
    peaks = {k: peak_memory_bytes(lambda: torch.autograd.grad(fn(), wrt), "cpu") for k, fn in impls.items()}
    chose = auto_choice(case, student, teacher, params)
    return {k: {part: stats(v) for part, v in t.items()} for k, t in times.items()}, peaks, chose


def profile_case(case: Case, impl: str) -> None:
    """Where the time of one implementation goes: torch.profiler over two forward+backward calls."""
    from torch.profiler import ProfilerActivity, profile

    student, teacher, params = make_inputs(case)
    wrt = [student] + [t for t in params.values() if t is not None]
    fn = implementations(case, student, teacher, params)[impl]
    torch.autograd.grad(fn(), wrt)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            torch.autograd.grad(fn(), wrt)
    print(f"## {case.op} {case.name}: {impl}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def fmt(s):
    return f"{s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", default=None, help="run cases whose op/name contains one of these comma-separated "
                    "strings")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    ap.add_argument("--impls", default=None, help="comma-separated implementations to run besides csrc, eager, "
                    "auto (default: all; e.g. 'compile' or 'none')")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation first")
    ap.add_argument("--sample-ms", type=float, default=100.0, help="a forward+backward sample is the mean of "
                    "as many back-to-back calls as last about this long (eager's time decides, same for all)")
    ap.add_argument("--profile", default=None, metavar="IMPL", help="print torch.profiler's table of two "
                    "forward+backward calls of IMPL (e.g. csrc) for each selected case, then exit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        for case in CASES:
            if not args.only or any(part in f"{case.op} {case.name}" for part in args.only.split(",")):
                profile_case(case, args.profile)
        return
    # auto measures in this run (fresh cache directory), whatever the caller's environment says
    os.environ["FASTKD_AUTO_TRIAL"] = "1"
    cache = tempfile.TemporaryDirectory(prefix="fastkd-bench-cache-")  # removed at exit
    os.environ["FASTKD_CACHE_DIR"] = cache.name
    columns = ["op", "case", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "x eager", "x compile",
               "GFLOP/s", "peak MiB", "peak vs eager", "target met", "auto chose", "auto ok"]
    rows = []
    load_before = os.getloadavg()
    for case in CASES:
        if args.only and not any(part in f"{case.op} {case.name}" for part in args.only.split(",")):
            continue
        res, peaks, chose = run_case(case, args.rounds, args.impls.split(",") if args.impls else None, args.warmup,
                                      args.sample_ms)
        full = {k: v["full"][0] for k, v in res.items()}
        for impl, r in res.items():
            x_eager = full["eager"] / full[impl]
            x_comp = full["compile"] / full[impl] if "compile" in full else float("nan")
            peak_ratio = peaks[impl] / peaks["eager"] if peaks[impl] and peaks["eager"] else float("nan")
            met = "-"
            if impl == "csrc" and "compile" in full:
                ok = x_eager >= 1.3 and x_comp >= 1.0 and peak_ratio < 1.0
                met = "yes" if ok else "NO"
            auto_ok = "-"
            if impl == "auto":  # within 5 % of the fastest backend auto chooses from
                auto_ok = "yes" if full["auto"] <= 1.05 * min(full["csrc"], full["eager"]) else "NO"
            rows.append([case.op, case.name, impl, fmt(r["fwd"]), fmt(r["bwd"]), fmt(r["full"]),
                         f"{x_eager:.2f}", f"{x_comp:.2f}", f"{3 * case.flops_fwd() / full[impl] / 1e6:.0f}",
                         f"{(peaks[impl] or 0) / 2**20:.1f}", f"{peak_ratio:.2f}", met,
                         chose if impl == "auto" else "-", auto_ok])
            print(" | ".join(str(v) for v in rows[-1]), flush=True)
    load_after = os.getloadavg()
    env = environment("cpu")
    model, vector = _auto._cpu_model()
    env["device"] = f"CPU {model} [{' '.join(vector)}] x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    env["load avg (1 min) before/after"] = f"{load_before[0]:.1f}/{load_after[0]:.1f}"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    notes = ("Median ms (20-80 % quantiles) over round-robin repetitions (fwd+bwd: each sample the mean of "
             f"back-to-back calls lasting ~{args.sample_ms:.0f} ms); x eager / x compile = speed-up of "
             "forward+backward; GFLOP/s counts forward+backward as 3x the forward's FLOPs of direct "
             "convolutions (an effective rate: csrc's MGD runs its 3x3 convolutions by Winograd F(4x4,3x3), "
             "~1/3 of those FLOPs; 'csrc (direct conv)' is the same kernels with oneDNN's direct convolutions, "
             "FASTKD_CSRC_MGD_ALGO=direct); target (csrc row): >= 1.3x eager, >= 1.0x compile, less peak "
             "memory than eager; auto ok (auto row): its fwd+bwd median within 5 % of the faster of csrc and eager "
             "(the backends it chooses from), the choice made by its own trial in this run ('auto chose': the "
             "backend, and the trial's best ms of one forward+backward).")
    if args.out:
        cmd = "python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:])
        write_results(args.out, "CPU: csrc vs reference eager vs torch.compile(reference), float32", columns,
                      rows, env, cmd, notes)


if __name__ == "__main__":
    main()
