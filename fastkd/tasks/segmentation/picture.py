"""A picture of predicted segmentation masks: val images, their label maps, and each run's prediction.

``draw_masks({"teacher": cfg, "baseline": cfg, ...}, scenes_root, "masks.png", n, weights=...)`` loads each
run's final student (``weights(run_dir)``: its state dict, e.g. :func:`fastkd.engine.export.student_state_dict`),
predicts the first ``n`` val scenes at their stored size, and draws one row per scene: the image, the label map, then one mask per run titled
with its pixel accuracy on that scene. Classes share one colour table (background dark grey, ignored
pixels white) with a legend underneath.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from ...config import Config, ConfigError
from ...data.segmentation.loader import SegBatch
from ...data.segmentation.sources import fashion_scenes
from ...data.segmentation.transforms import IGNORE_INDEX
from .task import SegmentationTask

Weights = Callable[[str], Dict[str, torch.Tensor]]  # run directory -> the final student's state dict

BACKGROUND = (0.25, 0.25, 0.25)
IGNORED = (1.0, 1.0, 1.0)


def colours(num_classes: int) -> np.ndarray:
    """[256, 3] floats: class 0 dark grey, 1.. from matplotlib's tab10/tab20, the ignore index white."""
    import matplotlib

    table = np.ones((256, 3))
    palette = matplotlib.colormaps["tab10" if num_classes <= 11 else "tab20"]
    table[0] = BACKGROUND
    for k in range(1, num_classes):
        table[k] = palette((k - 1) % palette.N)[:3]
    table[IGNORE_INDEX] = IGNORED
    return table


@torch.no_grad()
def predict(cfg: Config, samples: List[Tuple[np.ndarray, np.ndarray]], weights: Weights) -> List[np.ndarray]:
    """Label maps predicted by the final student of ``cfg.run_dir`` for (image, label) ``samples``."""
    task = SegmentationTask(cfg)
    model = task.build_model(cfg.student, "student")
    model.load_state_dict(weights(cfg.run_dir), strict=True)
    model.eval()
    out = []
    for image, label in samples:
        batch = SegBatch(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None],
                         torch.from_numpy(label)[None])
        batch = task.to_device(batch, "cpu")
        out.append(model(batch.images).argmax(dim=1)[0].numpy().astype(np.uint8))
    return out


def pixel_accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    scored = label != IGNORE_INDEX
    return float((pred[scored] == label[scored]).mean() * 100) if scored.any() else float("nan")


def draw_masks(runs: Dict[str, Config], scenes_root: str, out: str, n: int = 4, *, weights: Weights) -> str:
    """Draw ``out`` (PNG) for the first ``n`` val scenes of ``scenes_root``; returns ``out``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise ConfigError("the masks picture needs matplotlib (pip install matplotlib)") from None
    source = fashion_scenes(scenes_root, "val")
    samples = [source[i] for i in range(min(n, len(source)))]
    predictions = {name: predict(cfg, samples, weights) for name, cfg in runs.items()}
    table = colours(source.num_classes)
    cols = 2 + len(predictions)
    fig, axes = plt.subplots(len(samples), cols, figsize=(2.2 * cols, 2.0 * len(samples) + 0.8), squeeze=False)
    for row, (image, label) in enumerate(samples):
        cells = [("image", image), ("label map", table[label])]
        cells += [(f"{name} {pixel_accuracy(pred[row], label):.0f} %", table[pred[row]])
                  for name, pred in predictions.items()]
        for ax, (title, picture) in zip(axes[row], cells):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    handles = [Patch(color=table[k], label=name) for k, name in enumerate(source.classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.suptitle("val scenes: label map and predicted masks (title: pixel accuracy on that scene)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
