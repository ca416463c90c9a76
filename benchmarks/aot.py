"""Ahead-of-time compilation of the Triton kernels for real GPUs, on a machine without one.

The launches are the host code's own: ``capture`` runs the host functions of fastkd.ops.mgd_triton /
ct_triton on CPU tensors inside ``_target.bound_to(arch)`` (tile configs, pixel splits, TF32 as a CUDA
launch on that GPU would bind them) with every kernel of the two modules replaced by a recorder, so the
audit sees exactly the arguments the real launches pass. ``jobs`` binds each launch as Triton's JIT would
(its own binder: types, ``== 1`` and divisibility-by-16 specialisation) for every tile config the kernel's
prune keeps on that architecture, and ``compile_job`` lowers it through Triton's real pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin, ``ptxas`` from the triton wheel) for ``GPUTarget("cuda", arch, 32)``,
reading what a GPU would meet:

    regs, spill stores / loads   ptxas -v (bytes per thread)
    shared                       dynamic (Triton's request) + static shared memory of the cubin, per block,
                                 against the architecture's opt-in maximum
    mma                          tcgen05 (sm_100) / wgmma (sm_90 warpgroup MMA) / mma.sync / none, from the PTX
    loads                        global -> shared copies: cp.async of 16 bytes, narrower cp.async, TMA
                                 (cp.async.bulk.tensor), and synchronous ld.global (count and widths, PTX)
    sass                         SASS instructions (cuobjdump), occupancy (resident warps per SM)

Results are cached per compile input (kernel source hash, signature, constants, options, target, Triton
version) under ``cache_dir``: a rerun compiles only what changed. ``FACTS_VERSION`` names the way the facts are
read: the callers keep one cache per value, so a change here (bump it) re-reads every compile.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import struct
from typing import Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class Launch:
    kernel: str
    tuner: object  # triton Autotuner (None for a plain jit kernel)
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, name, obj, sink):
        self.name, self.obj, self.sink = name, obj, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            tuner = self.obj if hasattr(self.obj, "configs") else None
            self.sink.append(Launch(self.name, tuner, tuner.fn if tuner else self.obj, args, kwargs))
        return record


@contextlib.contextmanager
def recording(modules) -> List[Launch]:
    """Inside: every Triton kernel of ``modules`` (module-level jit functions and autotuners) records its
    launches instead of running; the host code calls them as module globals, so it launches into the list."""
    import triton

    sink: List[Launch] = []
    saved = []
    for module in modules:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, (triton.runtime.Autotuner, triton.runtime.JITFunction)):
                saved.append((module, name, obj))
                setattr(module, name, _Recorder(name, obj, sink))
    try:
        yield sink
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


def capture(run: Callable[[], None], arch: int) -> List[Launch]:
    """The launches ``run`` (host code on CPU tensors) makes when bound for sm_``arch``."""
    from fastkd.ops import _target, ct_triton, mgd_triton

    with _target.bound_to(arch), recording([mgd_triton, ct_triton]) as launches:
        run()
    return launches


# ------------------------------------------------------------------------------------------- binding

@dataclasses.dataclass
class Job:
    """One compile: a launch bound for a target with one tile config."""

    kernel: str
    arch: int
    config: dict  # kwargs of the tile config + num_warps / num_stages ({} for an untuned kernel)
    constexprs: dict  # the kernel's constexpr arguments (tile config included), by name
    src: object  # triton ASTSource
    options: dict
    key: str  # cache key: source, signature, constants, attributes, options, target, Triton version


def source_key(fn, _seen=None) -> str:
    """Hash of a kernel's source and of every jit function it calls (by name, recursively) and of the global
    values it reads: Triton's own cache key without the line numbers (moving a kernel in its file changes
    only the PTX's line info, not what ptxas makes of it), so the audited table stays valid across edits
    elsewhere in the file."""
    import triton

    seen = set() if _seen is None else _seen
    seen.add(fn)
    fn.cache_key  # noqa: B018  (fills fn.used_global_vals)
    h = hashlib.sha256(fn.src.encode())
    for name, value in sorted(fn.__globals__.items()):
        if isinstance(value, triton.runtime.JITFunction) and value not in seen and re.search(rf"\b{name}\b", fn.src):
            h.update(f"{name}:{source_key(value, seen)}".encode())
    h.update(repr(sorted((k[0], repr(v[0])) for k, v in fn.used_global_vals.items())).encode())
    return h.hexdigest()


def _target_of(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def kept_configs(launch: Launch, arch: int) -> list:
    """The tile configs the kernel's prune keeps for this launch on ``arch`` (all of them for an untuned
    kernel: a single empty config). The tuning table is not consulted: every config it could pick is here."""
    import triton

    if launch.tuner is None:
        return [triton.Config({})]
    prune = launch.tuner.early_config_prune
    named = dict(zip(launch.tuner.arg_names, launch.args))
    return prune.size_prune_for(arch)(launch.tuner.configs, named, **launch.kwargs)


def bind(launch: Launch, config, arch: int) -> Job:
    """Bind a launch as Triton's JIT binds it (its binder and argument packing) for ``arch``."""
    import triton
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = _target_of(arch)
    backend = make_backend(target)
    fn = launch.fn
    kwargs = {**launch.kwargs, **config.all_kwargs(), "debug": False}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    names = {(i,): p.name for i, p in enumerate(fn.params)}
    consts = {names[k]: v for k, v in constexprs.items() if k in names}
    opts = {k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
    key = hashlib.sha256(f"{source_key(fn)}|{sorted(signature.items())}|{sorted(consts.items())}|"
                         f"{sorted(attrs.items())}|{sorted(opts.items())}|sm_{arch}|{triton.__version__}".encode()).hexdigest()
    cfg = {**config.kwargs, "num_warps": options.num_warps, "num_stages": options.num_stages} if config.kwargs else {}
    return Job(launch.kernel, arch, cfg, consts, src, options.__dict__, key)


# ------------------------------------------------------------------------------------------ compiling

FACTS_VERSION = 2  # 2: tcgen05 (sm_100) among the MMA kinds

_CP_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s*\[[^\]]*\],\s*\[[^\]]*\],"
                       r"\s*(0x[0-9a-f]+|\d+)")
_LD_GLOBAL = re.compile(r"\bld\.global(?:\.\w+)*?\.(v[248]\.)?[bfsu](8|16|32|64)\b")


def ptx_facts(ptx: str) -> dict:
    """Tensor-core instruction kind and the global-memory loads of a kernel's PTX (static counts)."""
    mma = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma.mma_async" in ptx else
           "mma.sync" if "mma.sync" in ptx else "none")
    cp = [int(v, 0) for v in _CP_ASYNC.findall(ptx)]
    sync = {}
    for vec, bits in _LD_GLOBAL.findall(ptx):
        width = int(bits) // 8 * (int(vec[1]) if vec else 1)
        sync[width] = sync.get(width, 0) + 1
    return {"mma": mma, "cp_async_16": sum(1 for b in cp if b == 16), "cp_async_narrow": sum(1 for b in cp if b < 16),
            "cp_async_narrow_bytes": sorted(set(b for b in cp if b < 16)),
            "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "ld_global": sum(sync.values()), "ld_global_widths": {str(k): v for k, v in sorted(sync.items())}}


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                    r".*?Used (\d+) registers", re.S)


def _sections(elf: bytes) -> Dict[str, int]:
    """{section name: size} of an ELF64 file (a cubin)."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * entsize) for i in range(count)]
    strtab = headers[names][4]
    return {elf[strtab + h[0]:elf.index(b"\0", strtab + h[0])].decode(): h[5] for h in headers}


def cubin_facts(cubin: bytes, ptxas_log: str) -> dict:
    """Registers and spills (ptxas -v), static shared memory and SASS instructions (16 bytes each) of a cubin."""
    found = _PTXAS.search(ptxas_log)
    if found is None:
        raise RuntimeError(f"no ptxas -v report in the compile's output: {ptxas_log[-300:]!r}")
    sections = _sections(cubin)
    return {"regs": int(found.group(4)), "stack": int(found.group(1)), "spill_stores": int(found.group(2)),
            "spill_loads": int(found.group(3)),
            "static_shared": sum(v for k, v in sections.items() if k.startswith(".nv.shared.")),
            "sass": sum(v for k, v in sections.items() if k.startswith(".text.")) // 16}


def occupancy(arch: int, regs: int, shared: int, num_warps: int) -> int:
    """Resident warps per SM (theoretical): register file (256-register allocation units per warp),
    shared memory (plus the 1 KB the driver reserves per block), at most 32 blocks and 64 warps."""
    from fastkd.ops import _target

    fam = _target.family(arch)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = _target.REGISTERS_PER_SM // (per_warp * num_warps)
    by_smem = _target.SHARED_PER_SM[fam] // (shared + 1024) if shared else 32
    by_warps = _target.MAX_WARPS_PER_SM[fam] // num_warps
    return min(by_regs, by_smem, by_warps, 32) * num_warps


def compile_job(job: Job, cache_dir: Optional[str]) -> dict:
    """Compile ``job`` (or read its cached result) -> the facts of module docstring, plus ``error``."""
    import triton
    from triton import knobs

    from fastkd.ops import _target

    path = os.path.join(cache_dir, job.key + ".json") if cache_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            return {**json.load(f), "cached": True}
    out: dict = {"error": None}
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True  # printed by Triton after ptxas -v: registers and spills
            knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(job.src, target=_target_of(job.arch), options=job.options)
    except Exception as exc:  # noqa: BLE001 - a failed compile is a row of the table
        text = str(exc).strip().splitlines()
        out["error"] = f"{type(exc).__name__}: {text[0][:300] if text else ''}"
    else:
        out.update(ptx_facts(kernel.asm["ptx"]))
        out.update(cubin_facts(kernel.asm["cubin"], log.getvalue()))
        out["shared"] = kernel.metadata.shared + out["static_shared"]
        out["shared_limit"] = _target.SHARED_PER_BLOCK[_target.family(job.arch)]
        out["warps_per_sm"] = occupancy(job.arch, out["regs"], out["shared"], kernel.metadata.num_warps)
    if path:
        from fastkd.atomic import write_json

        write_json(path, out, indent=None)
    return out


def problems(result: dict) -> List[str]:
    """What a GPU would refuse or pay for: a compile error, spills, shared memory over the limit."""
    if result.get("error"):
        return [f"compile error ({result['error']})"]
    found = []
    if result["spill_stores"] or result["spill_loads"]:
        found.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads")
    if result["shared"] > result["shared_limit"]:
        found.append(f"shared memory {result['shared'] / 1024:.1f} KB > {result['shared_limit'] / 1024:.0f} KB")
    return found


def device_dtype(dtype: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
