"""Cityscapes (Cordts et al., CVPR 2016): the labelId -> trainId table and the folder layout.

    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

``fastkd data write cityscapes ROOT OUT`` writes ``OUT/train.beton`` and ``OUT/val.beton`` (images as
their PNG bytes, label maps in the 19 train ids, 255 = ignored), the form mmsegmentation trains on.
The table is Cityscapes' own (``cityscapesscripts/helpers/labels.py``): ids not listed, and the
license plate (-1), are ignored.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from .sources import SegDataError, SegFolderSource
from .transforms import IGNORE_INDEX

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
           "bicycle")

LABEL_TO_TRAIN: Dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
"""labelId -> trainId for the 19 evaluated classes; every other labelId (0-6 unlabeled/ego vehicle/
rectification border/out of roi/static/dynamic/ground, 9 parking, 10 rail track, 14 guard rail, 15
bridge, 16 tunnel, 18 polegroup, 29 caravan, 30 trailer) is ignored."""

SPLITS = ("train", "val")


def train_id_lut() -> np.ndarray:
    """uint8 [256]: labelId -> trainId, 255 for ignored ids."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


def source(root: str, split: str) -> SegFolderSource:
    """One split of a Cityscapes tree as a segmentation source (label maps in train ids)."""
    images = os.path.join(root, "leftImg8bit", split)
    labels = os.path.join(root, "gtFine", split)
    for d in (images, labels):
        if not os.path.isdir(d):
            raise SegDataError(f"{root} is not a Cityscapes root: {d} is missing (expected leftImg8bit/ and "
                               f"gtFine/ with {split}/<city>/ folders)")
    return SegFolderSource(images, labels, image_suffix="_leftImg8bit.png", label_suffix="_gtFine_labelIds.png",
                           classes=CLASSES, lut=train_id_lut())
