"""fastkd.data: FFCV writers and loaders, a PyTorch fallback, ImageFolder and Fashion-MNIST helpers.

Layout follows the data's path: ``idx`` / ``imagefolder`` / ``fashion_mnist`` (sources) ->
``writers`` (.beton) -> ``order`` + ``base`` (which samples, in which order, where we are) ->
``ffcv_loader`` / ``fallback`` (loaders) -> ``ffcv_seeded`` (FFCV's seeded crop + flip decoder),
``transforms`` (crops, normalisation), ``seeded`` (per-sample draws); ``build`` glues
them to a config and ``cli`` to ``fastkd data ...``.  FFCV is imported only when used.
Segmentation (images + label maps) has its own path: ``seg_sources`` / ``cityscapes`` (paired folders,
Cityscapes, fashion-scenes; .beton) -> ``seg_loader`` (``SegBatch`` loaders on the same order and
position contract) -> ``seg_transforms`` (joint, seeded rescale / crop / flip / photometric distortion).

Contract (what the engine codes against)
----------------------------------------
``build_loader(split, *, source, path, batch_size, num_workers, image_size, mean, std, device="cpu",
channels_last=False, dtype=torch.float32, distributed=False, rank=None, world_size=None, seed=0,
drop_last=None, train=None, shuffle=None, resolution_schedule=None, scale=(0.08, 1), ratio=(3/4, 4/3),
flip=True, center_ratio=None, os_cache=True, batches_ahead=3, on_corrupt="error") -> loader``

- source: 'ffcv' (``path`` = a .beton, or a directory holding ``<split>.beton``; val also finds
  test.beton), 'torch' (PyTorch DataLoader over an ImageFolder tree, ``path/<split>`` when present,
  or Fashion-MNIST IDX files: ``path`` = their directory or 'fashion-mnist'), 'auto' (ffcv when
  FFCV imports and a .beton is found, else torch).
- ``for images, labels in loader``: images float [N,3,S,S] normalised ``(x/255 - mean)/std`` on
  ``device`` in ``dtype`` (channels_last strides if asked), labels int64 [N] on ``device``;
  S = image_size, or ``resolution_schedule(epoch)`` for train (progressive resizing).
  FFCV reuses its output buffers: a batch is valid until ``batches_ahead + 2`` more are drawn.
- train (default ``split == 'train'``): RandomResizedCrop(scale, ratio) + horizontal flip, shuffled,
  drop_last; eval: centre crop of ``center_ratio * min side`` resized to S, in file order, all samples.
- ``len(loader)``: batches per full epoch on this rank.
- Order: a function of (seed, epoch, rank, world_size, batch_size, drop_last) only: same seed and
  epoch -> same order.  distributed (rank/world_size default to torch.distributed, else $RANK and
  $WORLD_SIZE): each rank reads a distinct strided shard of the epoch's permutation; with drop_last
  all ranks get the same number of full batches, without it the shards cover the set exactly once.
- ``set_epoch(e)``: next iteration reads epoch e from its start; a fully consumed epoch advances
  the epoch by itself.  ``skip_batches(k)``: next iteration starts at batch k.
  ``state_dict() -> {"epoch", "batch", ...}`` / ``load_state_dict(sd)``: exact mid-epoch resume.
- Reproducibility: order, crops and flips are functions of (seed, epoch, sample index) on both
  backends (:mod:`fastkd.data.seeded`, Philox per sample): the same seed gives the same batches on every
  run, on any number of loader threads, after a mid-epoch resume, and (pixels from the same file) on
  either backend.

``build_loaders(cfg=None, **overrides) -> (train_loader, val_loader)``: the same keys plus
``val_path``, ``val_batch_size``, ``train_split``, ``val_split``; a config object's other keys are
ignored, an unknown override is an error.

Writing: ``write_beton(source, out, ...)``, ``write_imagefolder_beton(root, out, ...)``,
``fashion_mnist.write_fashion_mnist_beton(out_dir, ...)`` -> train.beton / test.beton;
``fashion_mnist.locate(cache_dir=None)``.

Detection (COCO): ``scenes.write_fashion_scenes`` (Fashion-MNIST garments on canvases -> COCO JSON +
JPEG, label PNGs), ``coco.write_coco_beton`` (COCO -> .beton + category map), ``detection``
(``DetectionBatch``, resize / bucket / flip geometry, ``to_device``), ``detection_loader``
(``build_detection_loader(s)``: FFCV and DataLoader over the same .beton); evaluation in
``fastkd.tasks.coco_eval``.  Imported on use only.  CLI: ``fastkd.data.cli.add_parser(subparsers)`` adds
``data write imagefolder|fashion-mnist|fashion-scenes|coco`` and ``data inspect``; it sets ``func`` to the handler.
"""
from .build import build_loader, build_loaders, ffcv_available
from .fashion_mnist import locate as locate_fashion_mnist
from .fashion_mnist import write_fashion_mnist_beton
from .imagefolder import CorruptImageError
from .idx import read_idx, write_idx
from .order import epoch_order, num_batches
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ResolutionSchedule
from .writers import WriteReport, read_beton, write_beton, write_imagefolder_beton

__all__ = [
    "build_loader", "build_loaders", "ffcv_available", "locate_fashion_mnist", "write_fashion_mnist_beton",
    "CorruptImageError", "read_idx", "write_idx", "epoch_order", "num_batches", "IMAGENET_MEAN",
    "IMAGENET_STD", "ResolutionSchedule", "WriteReport", "read_beton", "write_beton",
    "write_imagefolder_beton",
]
