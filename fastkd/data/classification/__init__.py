"""Classification data: images with one label each.

Modules: ``imagefolder`` (an ImageFolder tree, checked), ``writers`` (sources -> .beton: ``write_beton``,
``write_imagefolder_beton``, ``write_fashion_mnist_beton``; ``read_beton``), ``build`` (``build_loader`` /
``make_loader``), ``ffcv_loader`` and ``torch_loader`` (the two loaders, the same batches), ``transforms``
(crops, resolution schedule), ``cli`` (``fastkd data write imagefolder | fashion-mnist``).

Contract of :func:`~fastkd.data.classification.build.make_loader` (``build_loader(data, split, ...)`` reads
the same options from a data config; a user factory ``data.source: package.module:factory`` is called so)
----------------------------------------------------------------------------------------------------------
``make_loader(split, *, source, path, batch_size, num_workers, image_size, mean, std, device="cpu",
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
"""
