"""fastkd.data: a shared core and one folder per task, following the data's path (sources -> .beton
writers -> order and position -> loaders -> transforms).

Core (this folder; it imports no task's folder):
  ``format``      the .beton + ``<file>.json`` sidecar, where a split's file lies, whether FFCV imports
  ``writer``      the one writer core: fields -> FFCV's writer -> one file, atomically, with its sidecar
  ``order``       epoch-seeded, sharded sample order (a function of seed, epoch, rank, world size only)
  ``base``        ``DataPosition`` (epoch, batch; exact mid-epoch resume), ``EpochLoader``, ``KeySampler``
  ``seeded``      per-sample Philox draws (crops, flips) and ``ffcv_seeded`` (FFCV's seeded crop decoder)
  ``ffcv_util``   the order handed to FFCV's Loader, torch's thread count kept from FFCV
  ``normalize``   ImageNet statistics, uint8 -> normalised float into a preallocated buffer
  ``build``       ``build_loader(task, data, split, ...)``: the one loader signature, dispatched per task
  ``cli``         ``fastkd data write ... | inspect``
Sources several tasks share (``sources/``): ``idx`` (IDX files), ``fashion_mnist`` (locate, load),
``scenes`` (fashion-scenes: Fashion-MNIST garments on canvases -> COCO JSON + JPEG + label PNGs).
Per task: ``classification/`` (ImageFolder and Fashion-MNIST .beton writers, FFCV and PyTorch loaders,
crops), ``detection/`` (COCO -> .beton, ``DetectionBatch`` and its geometry, FFCV and PyTorch loaders),
``segmentation/`` (paired folders, Cityscapes, .beton, ``SegBatch`` loaders, joint transforms).

Every task's loader is built the same way::

    from fastkd.config import DataConfig
    from fastkd.data import build_loaders
    train, val = build_loaders("classification", DataConfig(source="torch", path="fashion-mnist"),
                               batch_size=256, rank=0, world_size=1, seed=0)

and follows the same position contract (``len``, ``set_epoch``, ``skip_batches``, ``state_dict`` /
``load_state_dict``): the same seed gives the same batches on every run, any number of loader workers,
and after a mid-epoch resume. FFCV, OpenCV and torch are imported by the modules that use them, on use.
"""
from .build import LOADERS, build_loader, build_loaders
from .order import epoch_order, num_batches

__all__ = ["LOADERS", "build_loader", "build_loaders", "epoch_order", "num_batches"]
