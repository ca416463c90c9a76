"""Raw sources several tasks share: ``idx`` (IDX files), ``fashion_mnist`` (locate, verify, load the four
files), ``scenes`` (fashion-scenes: garments on canvases -> COCO JSON, JPEG, label PNGs; used by detection and
segmentation), ``cli`` (``fastkd data write fashion-scenes``)."""
