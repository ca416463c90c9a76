"""Segmentation data (images + label maps): ``sources`` (paired folders, fashion-scenes' masks, the .beton
writer and reader), ``cityscapes`` (its layout, labelId -> trainId), ``loader`` (``SegBatch`` loaders on the
shared order and position contract: ``build_loader``), ``transforms`` (joint, seeded rescale / crop / flip /
photometric distortion), ``cli`` (``fastkd data write cityscapes``)."""
