"""Detection data (COCO): ``coco`` (check an instances JSON, write it with its images to a .beton + category
map), ``batch`` (``DetectionBatch``; resize, bucket and flip geometry; ``to_device``), ``loader`` (FFCV and
PyTorch loaders over the same .beton: ``build_loader`` / ``make_loader``), ``ffcv_decoder`` (FFCV's
decode + resize + pad in one JIT pass), ``cli`` (``fastkd data write coco``). Evaluation is the task's
(:mod:`fastkd.tasks.detection.coco_eval`)."""
