"""COCO box evaluation with pycocotools, over the whole validation set and every rank.

  results = detections_to_coco(detections, batch.targets, label_to_category)   # per batch, each rank
  metrics = evaluate_coco(results, gt_json, image_ids=..., results_path=...)   # once, after the loop

``detections_to_coco`` maps torchvision-style detections (``{"boxes" xyxy on the batch image,
"scores", "labels" contiguous}``) back to the original image (undo the flip, then the per-axis
resize: :func:`fastkd.data.detection.batch.boxes_to_original`) and to COCO category ids, as COCO result
entries ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

``evaluate_coco`` gathers every rank's results (``all_gather_object`` when torch.distributed is
initialised), evaluates on rank 0 with ``COCOeval(gt, dt, "bbox")`` restricted to ``image_ids``
(default: every image of the ground truth; pass the ids the loader actually read so that images
left out of the .beton do not count as misses), writes the results JSON there when asked, and
broadcasts the metrics: every rank returns the same dict.  Keys: ``bbox_AP`` (AP@[.5:.95]),
``bbox_AP50``, ``bbox_AP75``, ``bbox_APs``, ``bbox_APm``, ``bbox_APl`` as fractions; pycocotools
reports -1 for a size range without ground truth.  ``max_dets`` is the detections per image kept
(COCO's 100; dense scenes may need more), and every AP is pycocotools' at that limit (its own
``summarize`` reads the limit 100 only: -1 at any other); ``bbox_max_dets`` says which it was.
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from ...atomic import write_json
from ...comm import all_gather_object, broadcast_object, rank
from ...data.detection.batch import boxes_to_original

METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl")
# (IoU threshold or None for the mean over .50:.05:.95, area range) of each metric, as COCOeval.summarize
_SUMMARY = ((None, "all"), (0.5, "all"), (0.75, "all"), (None, "small"), (None, "medium"), (None, "large"))


def detections_to_coco(detections: Sequence[Dict[str, torch.Tensor]], targets: Sequence[dict],
                       label_to_category: Sequence[int]) -> List[dict]:
    """One COCO result entry per detection, in the original image's pixels and COCO category ids."""
    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} detections for {len(targets)} images")
    lut = np.asarray(label_to_category, dtype=np.int64)
    out: List[dict] = []
    for det, target in zip(detections, targets):
        boxes = boxes_to_original(det["boxes"], target).numpy()
        labels = det["labels"].detach().cpu().numpy().astype(np.int64)
        if labels.size and (labels.min() < 1 or labels.max() >= len(lut)):
            raise ValueError(f"image {target['image_id']}: predicted labels {labels.min()}..{labels.max()} "
                             f"outside 1..{len(lut) - 1}")
        scores = det["scores"].detach().to(torch.float64).cpu().numpy()
        for (x0, y0, x1, y1), label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            out.append({"image_id": int(target["image_id"]), "category_id": int(lut[label]),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return out


def _write_json_atomic(path: str, obj) -> None:
    write_json(path, obj, indent=None)


def coco_metrics(results: List[dict], gt_json_path: str, *, image_ids: Optional[Iterable[int]] = None,
                 max_dets: int = 100) -> Dict[str, float]:
    """pycocotools box metrics of ``results`` against ``gt_json_path`` (one process, no gathering)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json_path)
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(set(int(i) for i in image_ids))
    unknown = sorted(set(ids) - set(gt.getImgIds()))
    if unknown:
        raise ValueError(f"{gt_json_path}: image ids {unknown[:5]} are not in the ground truth")
    max_dets = int(max_dets)
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    if not results:
        return {**{k: 0.0 for k in METRICS}, "bbox_max_dets": float(max_dets)}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([{**r, "bbox": list(r["bbox"])} for r in results])  # loadRes adds keys in place
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = ids
        ev.params.maxDets = sorted({1, 10, max_dets})  # evaluate() keeps the largest per image
        ev.evaluate()
        ev.accumulate()
    out = {k: summary_ap(ev, max_dets, iou, area) for k, (iou, area) in zip(METRICS, _SUMMARY)}
    return {**out, "bbox_max_dets": float(max_dets)}


def summary_ap(ev, max_dets: int, iou: Optional[float] = None, area: str = "all") -> float:
    """One AP line of ``COCOeval.summarize`` at the limit ``max_dets`` (one of ``ev.params.maxDets``):
    the mean of the accumulated precision [T, R, K, A, M] over the entries > -1 at that IoU threshold
    (all ten when None), area range and limit; -1 when there are none."""
    p = ev.params
    precision = ev.eval["precision"]
    if iou is not None:
        precision = precision[np.where(iou == p.iouThrs)[0]]  # exact, as summarize compares
    precision = precision[:, :, :, p.areaRngLbl.index(area), p.maxDets.index(max_dets)]
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def evaluate_coco(predictions: List[dict], gt_json_path: str, *, image_ids: Optional[Iterable[int]] = None,
                  results_path: Optional[str] = None, max_dets: int = 100) -> Dict[str, float]:
    """Box AP of every rank's ``predictions`` (COCO result entries); the same dict on every rank.

    ``image_ids``: this rank's evaluated images (gathered like the predictions); None = all of the
    ground truth.  ``results_path``: also write the gathered results there (rank 0, atomically).
    """
    parts = all_gather_object((list(predictions), None if image_ids is None else [int(i) for i in image_ids]))
    outcome = None
    if rank() == 0:
        results = [r for p, _ in parts for r in p]
        ids = None if any(i is None for _, i in parts) else [i for _, p in parts for i in p]
        try:
            if results_path:
                _write_json_atomic(results_path, results)
            outcome = ("ok", coco_metrics(results, gt_json_path, image_ids=ids, max_dets=max_dets))
        except (OSError, ValueError) as e:  # reported on every rank, so none waits forever
            outcome = ("error", str(e))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise ValueError(f"COCO evaluation failed: {outcome[1]}")
    return outcome[1]
