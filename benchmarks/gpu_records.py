"""The records of a GPU check (``benchmarks/gpu_check.py``): one JSON object a line in OUT/gpu_check.jsonl.

A part (``benchmarks/gpu_parts.py``) writes through its :class:`Context`, each record on disk at once, so
a part stopped at its limit loses none of the records it had finished; the driver reads them back
(:func:`read_records`) for the summary.
"""
from __future__ import annotations

import json
import os
from typing import List

RECORDS = "gpu_check.jsonl"


class Context:
    """What a part sees: the device, the dry-run flag, and the recorders (each record is on disk at once)."""

    def __init__(self, out: str, part: str, dry: bool):
        import torch

        self.out, self.part, self.dry = out, part, dry
        self.device = torch.device("cpu" if dry else "cuda")

    def _record(self, kind: str, **fields) -> None:
        with open(os.path.join(self.out, RECORDS), "a") as f:
            f.write(json.dumps({"part": self.part, "kind": kind, **fields}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def row(self, table: str, **fields) -> None:
        self._record("row", table=table, fields=fields)

    def check(self, name: str, ok: bool, detail: str = "", **extra) -> None:
        print(f"[{self.part}] {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self._record("check", name=name, ok=bool(ok), detail=detail, **extra)

    def target(self, name: str, met: bool, figure: str) -> None:
        print(f"[{self.part}] target {'met   ' if met else 'MISSED'} {name}: {figure}", flush=True)
        self._record("target", name=name, met=bool(met), figure=figure)

    def write_json(self, name: str, data) -> None:
        from fastkd.atomic import write_json

        write_json(os.path.join(self.out, name), data, indent=1, sort_keys=True)


def read_records(out: str) -> List[dict]:
    path = os.path.join(out, RECORDS)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:  # the last line of a part killed while writing it
                continue
    return records
