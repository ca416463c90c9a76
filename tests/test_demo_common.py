"""What the three demos share for seeds: the plan and run directories, mean and spread, the verdict line, the
table's cells; on synthetic results (the demos' end-to-end tests run them on real ones)."""
import os

import pytest

from fastkd.demos import detection as demo_det, segmentation as demo_seg
from fastkd.demos.common import (group, markdown_table, run_cells, seed_cells, seed_plan, seed_run_dir, seed_spread,
                                verdict)

METHODS = ("baseline", "mgd", "ct")


def results(values, key="mIoU", teacher=None):
    """``values``: name -> one value per seed; a teacher row first when given."""
    rows = [{"name": "teacher", "seed": 0, key: teacher}] if teacher is not None else []
    seeds = max(len(v) for v in values.values())
    return rows + [{"name": n, "seed": k, key: v[k]} for k in range(seeds) for n, v in values.items() if k < len(v)]


def test_verdict_yes_when_every_gain_beats_the_spread():
    line = verdict(results({"baseline": [9.0, 9.5], "mgd": [14.0, 15.0], "ct": [12.0, 12.5]}, teacher=20.0),
                   METHODS, "mIoU")
    assert line == ("every method above the baseline by more than the seed spread: yes "
                    "(mgd +5.25 vs spread 1.00; ct +3.00 vs spread 0.50)")


def test_verdict_no_when_a_gain_is_within_the_spread():
    # ct gains exactly its spread (1.0): not more than the spread
    line = verdict(results({"baseline": [10.0, 11.0], "mgd": [14.0, 14.5], "ct": [11.0, 12.0]}), METHODS, "mIoU")
    assert line.startswith("every method above the baseline by more than the seed spread: NO (")
    assert "ct +1.00 vs spread 1.00" in line and "mgd +3.75 vs spread 1.00" in line
    # the baseline's spread counts as well as the method's
    line = verdict(results({"baseline": [10.0, 13.0], "mgd": [13.0, 13.5]}), METHODS, "mIoU")
    assert "NO (mgd +1.75 vs spread 3.00)" in line


def test_verdict_scales_a_fraction_before_comparing_and_printing():
    """Box AP is stored as a fraction and shown x100."""
    rows = results({"baseline": [0.080, 0.082], "mgd": [0.095, 0.099], "ct": [0.081, 0.083]}, key="AP")
    line = verdict(rows, METHODS, "AP", 100.0)
    assert line.endswith("NO (mgd +1.60 vs spread 0.40; ct +0.10 vs spread 0.20)")
    assert seed_spread(group(rows)["mgd"], "AP", 100.0) == pytest.approx(0.4)


def test_no_verdict_without_two_seeds_or_a_baseline():
    assert verdict(results({"baseline": [9.0], "mgd": [15.0], "ct": [13.0]}, teacher=20.0), METHODS, "mIoU") == ""
    assert verdict(results({"baseline": [9.0, 9.1], "mgd": [15.0]}), METHODS, "mIoU") == ""  # mgd: one seed
    assert verdict(results({"mgd": [15.0, 15.1], "ct": [13.0, 13.2]}), METHODS, "mIoU") == ""
    assert verdict(results({"baseline": [9.0, 9.1]}), METHODS, "mIoU") == ""
    # a method that did not run is not judged; the order is the demo's, not the results'
    rows = results({"baseline": [9.0, 9.1], "ct": [13.0, 13.2], "mgd": [15.0, 15.1]})
    assert verdict(rows, METHODS, "mIoU").endswith("yes (mgd +6.00 vs spread 0.10; ct +4.05 vs spread 0.20)")


def test_seed_plan_and_run_dirs():
    assert seed_plan(METHODS, 2) == [("teacher", 0), ("baseline", 0), ("mgd", 0), ("ct", 0), ("baseline", 1),
                                     ("mgd", 1), ("ct", 1)]
    assert seed_plan(METHODS, 1) == [("teacher", 0)] + [(n, 0) for n in METHODS]
    assert seed_run_dir("runs/x", "mgd", 0) == os.path.join("runs/x", "mgd")
    assert seed_run_dir("runs/x", "mgd", 2) == os.path.join("runs/x", "mgd_seed2")


def test_table_cells():
    rows = [dict(r, images=64, images_per_s=10.0 + r["seed"], wall_s=5.0, run_dir=f"runs/{r['name']}_{r['seed']}")
            for r in results({"baseline": [0.0812, 0.0790], "mgd": [0.0950, 0.0990]}, key="AP", teacher=0.16)]
    runs = group(rows)
    assert list(runs) == ["teacher", "baseline", "mgd"]
    assert seed_cells(runs["teacher"], "AP", None, 100.0) == ["0", "16.00", "", ""]
    assert seed_cells(runs["mgd"], "AP", runs["baseline"], 100.0) == ["0,1", "9.70", "9.50-9.90", "+1.69"]
    assert run_cells(runs["mgd"], 1) == ["64", "10.5", "10", "runs/mgd_0 (+1)"]
    assert run_cells(runs["teacher"]) == ["64", "10", "5", "runs/teacher_0"]
    assert markdown_table(["a", "b"], [["1", ""]]) == "| a | b |\n|---|---|\n| 1 |  |"


@pytest.mark.parametrize("demo", (demo_det, demo_seg))
def test_dense_demos_take_seeds(demo, capsys):
    assert demo.parse_args([]).seeds == 1 and demo.parse_args(["--seeds", "3"]).seeds == 3
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            demo.parse_args(["--seeds", bad])
        assert "--seeds" in capsys.readouterr().err
    ns = demo.parse_args(["--seeds", "2", "--out", "runs/o"])
    first, second = demo.run_config("mgd", ns, "runs/o/teacher.pt", 0), demo.run_config("mgd", ns, "runs/o/t.pt", 1)
    assert second.seed == first.seed + 1 and second.run_dir == os.path.join("runs/o", "mgd_seed1")
    assert first.run_dir == os.path.join("runs/o", "mgd")
