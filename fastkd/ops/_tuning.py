"""Autotuning of the Triton kernels: a checked-in tuning table, a tuning mode, and the table's writer.

Every autotuned kernel is decorated with ``autotune`` (this module) instead of ``triton.autotune``. Before
Triton times any config for a new key, the decorator's prune step
  1. takes the configs shipped for the GPU's architecture (``_target.family``: sm_80 and sm_90 differ in
     shared memory and registers) and the inputs' element size, and drops those too large for the problem
     (the kernel's own ``size_prune``, if any); ``benchmarks/gpu_static.py`` compiles every one of them for
     both architectures (no spills, no shared-memory overflow);
  2. looks the key up in the tuning table (``triton_tuning.json`` beside this file, or the file named by
     ``FASTKD_TRITON_TUNING``) for this device: a hit is the only config left, so nothing is timed (an entry that is
     not one of step 1's configs is ignored: only audited configs run);
  3. otherwise keeps what the mode allows (``FASTKD_TRITON_TUNE``):
       table  (default)  the table's entry, else every remaining config is timed;
       few               the table's entry, else only the first ``FASTKD_TRITON_TUNE_FEW`` (default 2)
                         remaining configs, in the kernel's order of preference (validation runs: correct
                         results at a fraction of the compile and timing cost; 1 = no timing at all);
       full              the table is ignored and every remaining config is timed (to write a new table).
Keys are Triton's own: the kernel's key arguments (pixel counts enter bucketed to a power of two, so a
new H x W reuses the choice of its bucket) and the dtypes of its tensor arguments.

``FASTKD_TRITON_TUNE_CACHE=0`` turns off Triton's on-disk cache of autotuning results (default on: the
chosen tiles, and so the summation order and the loss bits, then persist across processes), so that
timings taken in one process (a contended parallel test run, say) never decide another's configs.
``table_entries`` returns what the kernels chose in this process, in the table's format, for a GPU run to
write a new table (benchmarks/gpu_check.py does).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Dict, List, Optional, Union

import triton

from ..atomic import atomic_write
from . import _target

MODES = ("table", "few", "full")
ConfigsFor = Callable[[Optional[int], int], List[triton.Config]]
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_tuning.json")
CACHE_RESULTS = os.environ.get("FASTKD_TRITON_TUNE_CACHE", "1") != "0"
_TUNED: List[tuple] = []  # (kernel name, its Autotuner) of every kernel decorated here, for table_entries


def few() -> int:
    value = os.environ.get("FASTKD_TRITON_TUNE_FEW", "2")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FASTKD_TRITON_TUNE_FEW={value!r}: expected a whole number >= 1")
    return int(value)


def mode() -> str:
    """The tuning mode from FASTKD_TRITON_TUNE (read at every new key, so a process can switch)."""
    value = os.environ.get("FASTKD_TRITON_TUNE", "table")
    if value not in MODES:
        raise ValueError(f"FASTKD_TRITON_TUNE={value!r}: expected one of {', '.join(MODES)}")
    return value


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """{device name: {kernel name: {key: config}}} from a table file (an absent file is an empty table)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tuning table {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices", {}), dict):
        raise ValueError(f"tuning table {path}: expected {{\"devices\": {{device: {{kernel: {{key: config}}}}}}}}")
    return data.get("devices", {})


def table_path() -> str:
    return os.environ.get("FASTKD_TRITON_TUNING") or TABLE_PATH


def device_name(device) -> str:
    """The table's device name: the GPU's name, or "interpreter" for tensors on the CPU."""
    import torch

    if device.type != "cuda":
        return "interpreter"
    return torch.cuda.get_device_name(device)


def key_string(values) -> str:
    return ",".join(str(v) for v in values)


def config_to_dict(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_dict(entry: dict, where: str) -> triton.Config:
    try:
        return triton.Config(dict(entry["kwargs"]), num_warps=int(entry["num_warps"]),
                             num_stages=int(entry["num_stages"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"tuning table entry {where}: expected kwargs, num_warps, num_stages ({exc})") from None


def _element_size(named_args: dict) -> int:
    return next(v for v in named_args.values() if hasattr(v, "dtype")).element_size()


class _Prune:
    """The prune step of one kernel (see the module docstring). It computes the key exactly as Triton's
    Autotuner does (key arguments in order, then the dtype of every tensor argument)."""

    def __init__(self, name: str, arg_names: List[str], keys: List[str], size_prune: Optional[Callable],
                 configs_for: Optional[ConfigsFor] = None):
        self.name, self.arg_names, self.keys, self.size_prune = name, arg_names, keys, size_prune
        self.configs_for = configs_for  # None: the configs Triton hands over, on every architecture

    def key(self, named_args: dict, kwargs: dict) -> str:
        args = {k: v for k, v in {**named_args, **kwargs}.items() if k in self.arg_names}
        values = [args[k] for k in self.keys if k in args]
        values += [str(v.dtype) for v in args.values() if hasattr(v, "dtype")]
        return key_string(values)

    def size_prune_for(self, arch: Optional[int]) -> Callable:
        """prune(configs, named_args, **kwargs) -> the configs this kernel may run on ``arch`` (None: the
        interpreter) for these arguments: those shipped for the architecture and the inputs' element size, less
        those too large for the problem (before the table and the mode)."""
        def prune(configs, named_args, **kwargs):
            shipped = configs if self.configs_for is None else self.configs_for(_target.family(arch),
                                                                                 _element_size(named_args))
            return self.size_prune(shipped, named_args, **kwargs) if self.size_prune is not None else shipped
        return prune

    def __call__(self, configs, named_args, **kwargs):
        device = next(v.device for v in named_args.values() if hasattr(v, "device"))
        configs = self.size_prune_for(_target.arch(device))(configs, named_args, **kwargs)
        how = mode()
        if how != "full":
            path = table_path()
            entry = _load_table(path).get(device_name(device), {}).get(self.name, {}).get(self.key(named_args, kwargs))
            if entry is not None:
                chosen = config_from_dict(entry, f"{path}: {self.name}")
                # only a config shipped for this architecture and size (audited by benchmarks/gpu_static.py)
                if any(config_to_dict(c) == config_to_dict(chosen) for c in configs):
                    return [chosen]
        return configs[:few()] if how == "few" else configs


def autotune(configs: Union[List[triton.Config], ConfigsFor], key: List[str], size_prune: Optional[Callable] = None,
             **kwargs):
    """``triton.autotune`` with the tuning table and mode. ``configs``: a list (every architecture), or
    ``configs(family, element_size)`` -> the configs shipped for an architecture family (``_target.family``:
    80, 90; None for the interpreter) and the inputs' element size in bytes; Triton is given their union.
    ``size_prune(configs, named_args, **kwargs)`` drops configs too large for the problem (it must keep at
    least one)."""
    configs_for = configs if callable(configs) else None

    def wrap(fn):
        name = fn.fn.__name__
        prune = _Prune(name, list(fn.arg_names), list(key), size_prune, configs_for)
        tuner = triton.autotune(configs=all_configs(configs_for) if configs_for else configs, key=key,
                                prune_configs_by={"early_config_prune": prune}, cache_results=CACHE_RESULTS,
                                **kwargs)(fn)
        _TUNED.append((name, tuner))
        return tuner
    return wrap


def tile_configs(tiles, element_size: int, names=("BLOCK_M", "BLOCK_N", "BLOCK_K"), **fixed) -> List[triton.Config]:
    """Configs of ``(m, n, k, num_warps, num_stages)`` tiles given for 16-bit inputs; 32-bit inputs take the same
    tiles with half the k (the reduction step): the same bytes per pipeline stage, so the same shared memory."""
    return [triton.Config({names[0]: m, names[1]: n, names[2]: k if element_size <= 2 else k // 2, **fixed},
                          num_warps=w, num_stages=s) for m, n, k, w, s in tiles]


def all_configs(configs_for: ConfigsFor) -> List[triton.Config]:
    """Every config of every architecture and element size, each once."""
    out: Dict[str, triton.Config] = {}
    for family in (None, *_target.FAMILIES):
        for size in (2, 4):
            for c in configs_for(family, size):
                out.setdefault(json.dumps(config_to_dict(c), sort_keys=True), c)
    return list(out.values())


def table_entries() -> Dict[str, Dict[str, dict]]:
    """{kernel name: {key: config}} of every config chosen in this process (timed or from the table)."""
    out: Dict[str, Dict[str, dict]] = {}
    for name, tuner in _TUNED:
        chosen = {key_string(k): config_to_dict(c) for k, c in tuner.cache.items()}
        if chosen:
            out.setdefault(name, {}).update(chosen)
    return out


def merge_table(path: str, device: str, entries: Dict[str, Dict[str, dict]]) -> None:
    """Add ``entries`` (from ``table_entries``) for ``device`` to the table file at ``path``."""
    data = {"devices": {}}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    per_device = data.setdefault("devices", {}).setdefault(device, {})
    for kernel, chosen in entries.items():
        per_device.setdefault(kernel, {}).update(chosen)
    with atomic_write(path) as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    _load_table.cache_clear()
