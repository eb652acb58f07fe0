"""Data-loading throughput: images/s into training-ready tensors (uint8 batches from ``make_loader``, ``to_float``).

Measures the built-in shapes dataset at 64×64, a folder of 256×256 PNGs with .txt captions (written first into a
temporary folder, resized to 64×64 by the one transform; decoded every epoch, and with the decoded images a repeating
stream keeps, ``DataConfig.decoded_memory_mb``), each with 0 and 2 worker processes, and a folder of
photo-sized JPEGs (3000×2000, ``--photos``) decoded whole and at the reduced DCT scale the user sources use
(``DataConfig.decode_side``), side by side. The loader runs as training runs it: shuffled, repeating. The first
``--warmup`` batches (worker start-up) are not timed.

    .venv/bin/python bench/data_loading.py              # print the table
    .venv/bin/python bench/data_loading.py --write      # ... and record it in bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dalle.data.config import DataConfig
from dalle.data.loader import make_loader
from dalle.data.shapes import from_config as shapes_source
from dalle.data.transforms import to_float

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- data_loading:start -->", "<!-- data_loading:end -->"


def throughput(cfg: DataConfig, workers: int, batch_size: int, n_batches: int, warmup: int) -> tuple[float, float]:
    """(images/s over ``n_batches`` after ``warmup`` batches, seconds to the first batch)."""
    loader = make_loader(cfg, batch_size, workers=workers, shuffle=True, repeat=True, drop_last=True)
    stream = iter(loader)
    t0 = time.perf_counter()
    first = 0.0
    for i in range(warmup):
        to_float(next(stream)["images"])
        if i == 0:
            first = time.perf_counter() - t0
    n = 0
    t1 = time.perf_counter()
    for _ in range(n_batches):
        n += to_float(next(stream)["images"]).shape[0]  # (B, 3, H, W) float32
    rate = n / (time.perf_counter() - t1)
    stream.close()  # shuts the workers down
    return rate, first


def write_folder(root: Path, n_images: int, resolution: int) -> None:
    """``n_images`` shapes PNGs with same-named .txt captions: the user-folder format."""
    src = shapes_source(DataConfig(size=n_images, resolution=resolution))
    for r in src.records():
        name = r.key.replace("/", "_")
        r.load().save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(r.caption + "\n")


def write_photos(root: Path, n_images: int, size: tuple[int, int]) -> None:
    """``n_images`` smooth colour gradients saved as JPEGs of a camera's size (what decoding costs), with captions."""
    import numpy as np
    from PIL import Image

    w, h = size
    x, y = np.linspace(0, 6, w)[None, :, None], np.linspace(0, 4, h)[:, None, None]
    for i in range(n_images):
        phase = np.array([1, 2, 3]) + i / n_images
        Image.fromarray((127 + 100 * np.sin(x + y * phase)).astype(np.uint8)).save(root / f"p{i:04d}.jpg", quality=90)
        (root / f"p{i:04d}.txt").write_text(f"photo number {i}\n")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    return f"{nproc} cores (nproc), {cpu}; Python {platform.python_version()}, torch {torch.__version__}"


def record(table: str, command: str, load: str) -> None:
    section = "\n".join([
        START, "## Data loading (`bench/data_loading.py`)", "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- load average (1 min) before / after: {load} (other processes share these cores)",
        f"- date: {datetime.date.today().isoformat()}", "",
        table, END])
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--folder-images", type=int, default=2000, help="PNGs written for the folder measurement")
    p.add_argument("--folder-resolution", type=int, default=256)
    p.add_argument("--photos", type=int, default=64, help="3000×2000 JPEGs written for the photo measurement (0: skip)")
    p.add_argument("--photo-batches", type=int, default=8, help="timed batches of the photo measurement")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the main process: with workers busy on every core, more OpenMP threads "
                   "for to_float only wait on each other (25 ms instead of 0.7 ms per batch here)")
    p.add_argument("--write", action="store_true", help=f"record the table in {RESULTS.name}")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    rows = []
    for workers in args.workers:
        cfg = DataConfig(source="shapes", resolution=args.resolution)
        rows.append((f"shapes {args.resolution}×{args.resolution}", workers,
                     *throughput(cfg, workers, args.batch_size, args.batches, args.warmup)))
        print(rows[-1], flush=True)
    note = ""
    if args.folder_images <= 0:
        pass
    elif importlib.util.find_spec("dalle.data.user") is None:
        note = "folder of PNGs: not measured (dalle.data.user, the folder source, is not importable yet)"
        print(note)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            write_folder(Path(tmp), args.folder_images, args.folder_resolution)
            print(f"wrote {args.folder_images} PNGs in {time.perf_counter() - t:.1f} s")
            for workers in args.workers:
                for kept in (False, True):
                    cfg = DataConfig(source=tmp, resolution=args.resolution,
                                     **({} if kept else {"decoded_memory_mb": 0}))
                    label = (f"folder: {args.folder_images} PNGs {args.folder_resolution}² → {args.resolution}², "
                             + ("decoded images kept" if kept else "decoded every epoch"))
                    rows.append((label, workers, *throughput(cfg, workers, args.batch_size, args.batches,
                                                             args.warmup)))
                    print(rows[-1], flush=True)

    if args.photos > 0:
        with tempfile.TemporaryDirectory() as tmp:
            write_photos(Path(tmp), args.photos, (3000, 2000))
            label = f"folder: {args.photos} JPEGs 3000×2000 → {args.resolution}², decoded"
            for workers in args.workers:
                for how, whole in (("whole", True), ("at a reduced scale", False)):
                    # every epoch decoded again, so that the rows time the decoding (--photo-batches spans epochs)
                    cfg = DataConfig(source=tmp, resolution=args.resolution, decoded_memory_mb=0)
                    original = DataConfig.decode_side
                    if whole:  # the loader before reduced-scale decoding: every JPEG decoded whole
                        DataConfig.decode_side = property(lambda self: None)
                    try:
                        rate = throughput(cfg, workers, 16, args.photo_batches, 1)
                    finally:
                        DataConfig.decode_side = original
                    rows.append((f"{label} {how} (batch 16, {args.photo_batches} batches)", workers, *rate))
                    print(rows[-1], flush=True)

    lines = [f"batch {args.batch_size}, {args.batches} timed batches after {args.warmup} warm-up batches; "
             f"shuffled, repeating, `to_float` included; {args.threads} torch thread(s) in the main process", "",
             "| data | workers | images/s | first batch (s) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {w} | {rate:,.0f} | {first:.2f} |" for name, w, rate, first in rows]
    if note:
        lines += ["", note]
    table = "\n".join(lines)
    print(table)
    if args.write:
        load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
        record(table, " ".join([".venv/bin/python", "bench/data_loading.py", *sys.argv[1:]]), load)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
