"""Loader throughput: FFCV vs the PyTorch DataLoader fallback on the same images, same run.

Both read the same synthetic ImageFolder of ~400 px JPEGs (textured, so JPEG decoding costs what
it costs on photos) and produce the same batches: RandomResizedCrop to --size + flip + normalise,
float32 NCHW, with the same number of workers.  FFCV reads .beton files
written from that folder with each of --ffcv-modes ('raw': decoded pixels, FFCV's choice for
small images; 'jpg': JPEG q90, as `fastkd data write imagefolder --write-mode jpg`); the fallback
decodes the JPEG files with PIL in DataLoader worker processes.  Reported: images/s over whole epochs after one
warm-up epoch (FFCV's JIT compile and page cache), median of --epochs, and the time from the start
of an epoch to its first batch (the pipeline fill every epoch pays).  Use epochs of at least ~16
batches (the default 1024 images): with a handful of batches per epoch the fill, not the loader's
throughput, dominates the figure (an ImageNet epoch is 20,000 batches).

  python benchmarks/bench_data.py --images 1024 --workers 2 --epochs 3 --out benchmarks/results/data_cpu.md

With --detection: the detection pipeline instead (fastkd.data.detection.loader), on fashion-scenes
(--images scenes of 5 canvas sizes, 160x320 .. 320x240, JPEG q90, 1-8 garments with boxes) written
with `fastkd data write coco` to one .beton that both loaders read: decode, aspect-keeping resize
(--min-size / --max-size), seeded flip of image and boxes, pad to the batch's bucket, batches grouped
by orientation, uint8 batches with their targets (normalisation is ``to_device``'s, on the GPU in
training, the same for both, and not timed).  FFCV decodes + resizes + pads in its
JIT-compiled pass; the DataLoader does the same with OpenCV in its worker processes.

  python benchmarks/bench_data.py --detection --images 512 --batch-size 16 --epochs 3 \\
      --out benchmarks/results/data_cpu.md

With --segmentation: the segmentation loader (fastkd.data.segmentation.loader) on a synthetic Cityscapes tree
(leftImg8bit/train/<city>/*_leftImg8bit.png + gtFine/train/<city>/*_gtFine_labelIds.png, --images images of
--seg-size, default 1024x512; textured PNGs of about 1 byte a pixel like Cityscapes' photos, label maps of
blocks of the 19 classes and ignored regions, in labelIds as Cityscapes ships them), every row through the same
seeded training transform (fastkd.data.segmentation.transforms with configs/cityscapes' settings, img_scale
the images' own size, as the configs' 2048x1024 at --seg-size 2048x1024: rescale ratio 0.5-2.0, --size square
crop, cat_max_ratio 0.75, flip 0.5, photometric distortion; uint8 batches, normalisation on the device not
timed), same batch size and --workers DataLoader workers.  Rows: the .beton written by `fastkd data write
cityscapes` (image_format png: the PNG files byte for byte), a .beton with image_format jpg (q95: lossy, a
cheaper decode), and the Cityscapes folder read directly (the 1.00x reference).  All three run in PyTorch
DataLoader worker processes: fastkd reads a segmentation .beton with its own decoder (OpenCV for the image,
PIL for the label map), not FFCV's JIT-compiled pipeline (fastkd does not use it for variable-size label
maps).  What the .beton buys is one memory-mapped file instead of two files opened per sample and, with jpg,
a cheaper decode than PNG; with png it is the same decode work as the folder.

  python benchmarks/bench_data.py --segmentation --images 128 --batch-size 8 --workers 2 --epochs 3 \\
      --out benchmarks/results/data_cpu.md
"""
from __future__ import annotations

import argparse
import importlib.metadata
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_folder(root: str, n: int, classes: int = 10, side: int = 400) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    for k in range(n):
        d = os.path.join(root, f"c{k % classes}")
        os.makedirs(d, exist_ok=True)
        h, w = side - int(rng.integers(0, 100)), side
        # Smooth gradients plus noise: JPEGs of realistic size (~40-60 KB at q90), not flat colour.
        base = np.stack([(xx * (c + 1) * 0.3 + yy * 0.2 * (2 - c) + 40 * c) % 256 for c in range(3)], -1)
        img = np.clip(base[:h] + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{k}.jpg"), quality=90)


def run_epochs(loader, epochs: int) -> tuple:
    """images/s of whole epochs, and the time from the start of each epoch to its first batch (ms)."""
    rates, firsts = [], []
    for epoch in range(epochs + 1):  # epoch 0 warms up (JIT compile, worker start, page cache)
        loader.set_epoch(epoch)
        n, t0, first = 0, time.perf_counter(), None
        for images, _ in loader:
            if first is None:
                first = time.perf_counter() - t0
            n += images.shape[0]
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
            firsts.append(1e3 * first)
    return rates, firsts


def run_detection_epochs(loader, epochs: int) -> tuple:
    """Like run_epochs for detection and segmentation batches (uint8, as the loaders hand them to ``to_device``)."""
    rates, firsts = [], []
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        n, t0, first = 0, time.perf_counter(), None
        for batch in loader:
            if first is None:
                first = time.perf_counter() - t0
            n += len(batch)
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
            firsts.append(1e3 * first)
    return rates, firsts


def detection(args, work: str) -> tuple:
    """FFCV vs DataLoader on one COCO .beton of fashion-scenes; returns (results, data line)."""
    from fastkd.data.detection.coco import write_coco_beton
    from fastkd.data.detection.loader import make_loader
    from fastkd.data.sources.scenes import ScenesConfig, write_fashion_scenes

    scenes = os.path.join(work, f"scenes-{args.images}")
    if not os.path.isdir(scenes):
        write_fashion_scenes(scenes, ScenesConfig(train=args.images, val=0))
    beton = os.path.join(work, f"scenes-{args.images}.beton")
    if not os.path.exists(beton):
        write_coco_beton(os.path.join(scenes, "train"), os.path.join(scenes, "annotations", "instances_train.json"),
                         beton)
    files = [os.path.join(scenes, "train", f) for f in os.listdir(os.path.join(scenes, "train"))]
    jpeg_kb = np.mean([os.path.getsize(f) for f in files]) / 1024
    results = {}
    for name, source in (("ffcv (detection, jpg .beton)", "ffcv"),
                         ("torch DataLoader (detection, same .beton)", "torch")):
        loader = make_loader(beton, source=source, train=True, batch_size=args.batch_size, num_workers=args.workers,
                             min_size=args.min_size, max_size=args.max_size, seed=0)
        rates, firsts = run_detection_epochs(loader, args.epochs)
        results[name] = (statistics.median(rates), min(rates), max(rates), statistics.median(firsts))
        print(f"{name:>18}: {results[name][0]:8.1f} images/s (min {min(rates):.1f}, max {max(rates):.1f}), "
              f"first batch after {results[name][3]:.0f} ms")
        del loader
    line = (f"- data: {args.images} fashion-scenes JPEGs (160x320 to 320x240, mean {jpeg_kb:.0f} KB, q90) with "
            f"1-8 boxes each, one COCO .beton; output: resize to shorter side {args.min_size} / longer at most "
            f"{args.max_size}, seeded flip of image and boxes, padded to the orientation bucket, uint8 "
            f"(to_device's normalisation not timed), batch {args.batch_size}, {args.workers} workers each, median of "
            f"{args.epochs} epochs after 1 warm-up")
    return results, line


CITIES = ("aachen", "bochum", "bremen")


def make_cityscapes(root: str, n: int, width: int, height: int) -> None:
    """A synthetic Cityscapes train split: n textured PNG images and their labelIds maps (blocks of the 19
    classes, sky on top, road below, an ignored ego-vehicle strip at the bottom and a few ignored patches)."""
    import cv2

    from fastkd.data.segmentation.cityscapes import LABEL_TO_TRAIN

    to_label = np.zeros(256, np.uint8)  # train id -> labelId; 255 (ignored) -> 0 (unlabeled)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        to_label[train_id] = label_id
    rng = np.random.default_rng(0)
    palette = rng.integers(30, 226, (256, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = np.stack([(xx * (c + 1) * 0.15 * 1024 / width + yy * 0.1 * (2 - c) * 512 / height + 40 * c) % 256
                         for c in range(3)], -1)
    bands = ((10, 2, 8), (2, 8, 5, 6, 7, 3, 4), (11, 12, 13, 14, 15, 16, 17, 18, 9, 8), (0, 1, 0, 9))
    for k in range(n):
        city = CITIES[k % len(CITIES)]
        stem = f"{city}_{k // len(CITIES):06d}_000019"
        for d in ("leftImg8bit", "gtFine"):
            os.makedirs(os.path.join(root, d, "train", city), exist_ok=True)
        grid = np.stack([rng.choice(bands[min(r * len(bands) // 8, len(bands) - 1)], 16) for r in range(8)])
        train = cv2.resize(grid.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        for _ in range(int(rng.integers(3, 9))):  # objects and ignored patches over the blocks
            h, w = int(rng.integers(height // 16, height // 3)), int(rng.integers(width // 32, width // 6))
            t, l = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            train[t:t + h, l:l + w] = rng.choice([255, 11, 13, 5, 6, 7, 17, 18])
        train[height - height // 12:] = 255
        # Region colours, smooth gradients and correlated noise: ~1 byte a pixel as PNG, as Cityscapes' photos.
        noise = cv2.GaussianBlur(rng.normal(0, 6, (height, width, 3)).astype(np.float32), (0, 0), 1.0)
        image = np.clip(0.6 * palette[train] + 0.4 * gradient + noise, 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(root, "leftImg8bit", "train", city, f"{stem}_leftImg8bit.png"),
                    cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 6])
        cv2.imwrite(os.path.join(root, "gtFine", "train", city, f"{stem}_gtFine_labelIds.png"), to_label[train])


def segmentation(args, work: str) -> tuple:
    """.beton (png), .beton (jpg q95) and the Cityscapes folder through the same training transform; returns
    (results, data line); the folder is the last (reference) entry."""
    from fastkd.config import DataConfig
    from fastkd.data.segmentation import cityscapes
    from fastkd.data.segmentation.loader import build_loader
    from fastkd.data.segmentation.sources import BetonSegSource, write_seg_beton

    width, height = (int(v) for v in args.seg_size.lower().split("x"))
    name = f"cityscapes-{width}x{height}-{args.images}"
    root = os.path.join(work, name)
    if not os.path.isdir(root):
        make_cityscapes(root, args.images, width, height)
    runs = []
    for fmt, label in (("png", "png, the PNG files as they are"), ("jpg", "jpg q95, lossy")):
        beton = os.path.join(work, f"{name}-{fmt}.beton")
        if not os.path.exists(beton):
            write_seg_beton(cityscapes.source(root, "train"), beton, image_format=fmt, jpeg_quality=95,
                            force=True, progress=False)
        runs.append((f".beton ({label})", "ffcv", beton))
    runs.append(("Cityscapes folder (PNG files), reference", "cityscapes", root))
    kwargs = dict(img_scale=(width, height), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip_prob=0.5,
                  photometric=True)
    results = {}
    for row, kind, path in runs:
        data = DataConfig(source=kind, path=path, image_size=args.size, num_workers=args.workers, kwargs=kwargs)
        loader = build_loader(data, "train", batch_size=args.batch_size, seed=0)
        rates, firsts = run_detection_epochs(loader, args.epochs)
        results[row] = (statistics.median(rates), min(rates), max(rates), statistics.median(firsts))
        print(f"{row:>18}: {results[row][0]:8.1f} images/s (min {min(rates):.1f}, max {max(rates):.1f}), "
              f"first batch after {results[row][3]:.0f} ms")
        del loader

    def mean_kb(sub: str) -> float:
        d = os.path.join(root, sub, "train")
        return np.mean([os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs]) / 1024

    jpg_kb = BetonSegSource(runs[1][2]).image_meta["size"].mean() / 1024
    line = (f"- data: {args.images} synthetic Cityscapes images, {width}x{height} RGB PNG (mean "
            f"{mean_kb('leftImg8bit'):.0f} KB; label maps {mean_kb('gtFine'):.0f} KB, labelIds -> 19 train ids + 255), "
            f"the jpg .beton's images mean {jpg_kb:.0f} KB (q95); output: rescale ratio 0.5-2.0 of {width}x{height}, "
            f"{args.size}x{args.size} crop (cat_max_ratio 0.75), flip 0.5, photometric distortion, uint8 "
            f"(to_device's normalisation not timed), "
            f"batch {args.batch_size}, {args.workers} DataLoader workers each (every row), median of {args.epochs} "
            f"epochs after 1 warm-up")
    return results, line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--size", type=int, default=None,
                   help="output side (default 224); --segmentation: the square crop (default 512)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64; --segmentation: 8")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--channels-last", action="store_true", help="channels_last output (both loaders)")
    p.add_argument("--ffcv-modes", default="raw,jpg", help="write modes of the .beton files to compare")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--out", default=None, help="append the result table to this markdown file")
    p.add_argument("--detection", action="store_true", help="benchmark the detection loaders instead")
    p.add_argument("--min-size", type=int, default=320, help="detection: shorter side after resizing")
    p.add_argument("--max-size", type=int, default=512, help="detection: longer side at most")
    p.add_argument("--segmentation", action="store_true", help="benchmark the segmentation loaders instead")
    p.add_argument("--seg-size", default="1024x512", help="segmentation: WxH of the synthetic Cityscapes images")
    args = p.parse_args()
    args.size = args.size or (512 if args.segmentation else 224)
    args.batch_size = args.batch_size or (8 if args.segmentation else 64)

    from fastkd.data.classification.build import make_loader
    from fastkd.data.classification.writers import write_imagefolder_beton

    work = args.dir or tempfile.mkdtemp(prefix="fastkd-bench-data-")
    if args.detection:
        results, data_line = detection(args, work)
        report(args, results, data_line)
        return
    if args.segmentation:
        results, data_line = segmentation(args, work)
        report(args, results, data_line, ref="folder")
        return
    folder = os.path.join(work, "train")
    if not os.path.isdir(folder):
        make_folder(folder, args.images)
    runs = []
    for mode in args.ffcv_modes.split(","):
        beton = os.path.join(work, f"train-{mode}.beton")
        if not os.path.exists(beton):
            write_imagefolder_beton(folder, beton, write_mode=mode, jpeg_quality=90, progress=False)
        runs.append((f"ffcv ({mode} .beton)", "ffcv", beton))
    runs.append(("torch DataLoader (PIL)", "torch", folder))
    jpeg_kb = np.mean([os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs]) / 1024
    common = dict(path=None, batch_size=args.batch_size, num_workers=args.workers, image_size=args.size, seed=0,
                  channels_last=args.channels_last)
    results = {}
    for name, source, path in runs:
        loader = make_loader("train", source=source, **{**common, "path": path})
        rates, firsts = run_epochs(loader, args.epochs)
        results[name] = (statistics.median(rates), min(rates), max(rates), statistics.median(firsts))
        print(f"{name:>18}: {results[name][0]:8.1f} images/s (min {min(rates):.1f}, max {max(rates):.1f}), "
              f"first batch after {results[name][3]:.0f} ms")
        del loader
    data_line = (f"- data: {args.images} synthetic JPEGs, 300-400 x 400 px, mean {jpeg_kb:.0f} KB (q90); "
                 f"output {args.size}x{args.size} RandomResizedCrop(0.08-1) + flip + normalise, float32"
                 f"{' channels_last' if args.channels_last else ''}, batch {args.batch_size}, {args.workers} workers "
                 f"each, median of {args.epochs} epochs after 1 warm-up")
    report(args, results, data_line)


def report(args, results: dict, data_line: str, ref: str = "torch") -> None:
    """Print the ratios to the reference (the last entry: the DataLoader, or ``ref``); append the table to --out."""
    import torch

    from fastkd.data.base import cpu_count

    names = list(results)
    base = results[names[-1]][0]
    for name in names[:-1]:
        print(f"{name} / {ref}: {results[name][0] / base:.2f}x")
    if args.out:
        cmd = "python benchmarks/bench_data.py " + " ".join(sys.argv[1:])
        load = os.getloadavg()
        rows = [f"## {datetime.date.today().isoformat()} - {_cpu_model()}, {cpu_count()} CPU cores, no GPU", "",
                f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
                f"ffcv {importlib.metadata.version('ffcv')}, numpy {np.__version__}",
                f"- command: `{cmd}`",
                data_line,
                f"- load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
                + ("(other jobs were running: absolute numbers are noisy, compare the ratios)"
                   if load[0] > 1.5 else f"(about idle for {cpu_count()} cores)"), "",
                f"| loader | images/s (median) | min | max | vs {ref} | first batch (ms) |",
                "|---|---|---|---|---|---|"]
        rows += [f"| {k} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {v[0] / base:.2f}x | {v[3]:.0f} |"
                 for k, v in results.items()]
        rows += ["", ""]
        tail = b"\n\n"  # the new section starts after a blank line
        if os.path.exists(args.out) and os.path.getsize(args.out):
            with open(args.out, "rb") as f:
                f.seek(-min(2, os.path.getsize(args.out)), os.SEEK_END)
                tail = f.read()
        gap = "" if tail.endswith(b"\n\n") else "\n" if tail.endswith(b"\n") else "\n\n"
        with open(args.out, "a") as f:
            f.write(gap + "\n".join(rows))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
