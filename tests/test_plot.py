"""plot_compare: runs evaluated once (the dense demos) get one column per run with each seed's value; runs
evaluated along the way get lines over steps."""
import json

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from fastkd.engine.plot import _compare_figure, _final_points, plot_compare  # noqa: E402


def _run(path, evals, losses=(2.0, 1.0)):
    path.mkdir(parents=True)
    rows = [{"kind": "train", "step": 10 * (i + 1), "loss/ce": v} for i, v in enumerate(losses)]
    rows += [{"kind": "eval", "step": s, "val/mIoU": v} for s, v in evals]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_final_points_one_column_per_run_with_the_mean_and_range():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    _final_points(ax, {"baseline": ([800], [[9.0, 10.0, 11.0]]), "mgd": ([800], [[20.0, 24.0, 22.0]])})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["baseline", "mgd"]
    means = [line.get_ydata()[0] for line in ax.lines if len(line.get_xdata()) == 1 and line.get_marker() == "o"]
    assert means == pytest.approx([10.0, 22.0])
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["baseline: 10.00 (9.00-11.00)", "mgd: 22.00 (20.00-24.00)"]
    plt.close(fig)


def _runs(tmp_path, evals):
    return {"baseline": [_run(tmp_path / "b0", evals), _run(tmp_path / "b1", [(s, v + 1) for s, v in evals])],
            "mgd": [_run(tmp_path / "m0", [(s, v + 3) for s, v in evals])]}


def test_runs_evaluated_once_get_a_column_each_and_runs_evaluated_along_the_way_get_lines(tmp_path):
    import matplotlib.pyplot as plt

    kw = dict(teacher=9.0, metric="val/mIoU", title="mIoU", scale=1.0, loss="loss/ce")
    once = _compare_figure(plt, _runs(tmp_path / "once", [(20, 5.0)]), **kw)
    acc = once.axes[0]
    assert [t.get_text() for t in acc.get_xticklabels()] == ["baseline", "mgd"] and acc.get_title() == "mIoU at step 20"
    assert acc.get_legend_handles_labels()[1] == ["teacher: 9.00", "baseline: 5.50 (5.00-6.00)", "mgd: 8.00"]
    along = _compare_figure(plt, _runs(tmp_path / "along", [(10, 4.0), (20, 5.0)]), **kw)
    acc = along.axes[0]
    assert acc.get_xlabel() == "step" and acc.get_title() == "mIoU"
    curves = {line.get_label(): list(line.get_ydata()) for line in acc.lines if line.get_label() != "teacher: 9.00"}
    assert curves == {"baseline (2 seeds)": [4.5, 5.5], "mgd": [7.0, 8.0]}
    loss = {line.get_label(): list(line.get_ydata()) for line in along.axes[1].lines}
    assert loss == {"baseline (2 seeds)": [2.0, 1.0], "mgd": [2.0, 1.0]}
    plt.close("all")


def test_plot_compare_writes_the_picture(tmp_path):
    out = plot_compare(_runs(tmp_path, [(20, 5.0)]), str(tmp_path / "compare.png"), teacher=9.0, metric="val/mIoU",
                       title="validation mIoU (%)")
    assert out == str(tmp_path / "compare.png") and (tmp_path / "compare.png").stat().st_size > 10000
