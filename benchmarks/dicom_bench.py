"""DICOM decode benchmark: ``decode_dicom`` on a 2,000 x 2,500 16-bit DX film in each transfer syntax.

The film is the sample set's grey PNG upscaled (bicubic) to 2,000 columns x 2,500 rows, made
16-bit and given detector-like noise (Gaussian, sigma 64 levels, fixed seed) so that lossless
codecs do not find it unrealistically easy (the table gives file sizes), then written by pydicom's
encoders as an uncompressed, RLE, JPEG-LS lossless and JPEG 2000 lossless DX object, with a
window and without one (the robust min-max). Prints a markdown table of the median and best wall time of
``decode_dicom`` over ``--repeat`` runs, and of its parts (header parse, pixel decode, display).
This is a script, not a test; it uses one thread, like one pipeline worker.

Usage::

    python benchmarks/dicom_bench.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SYNTAXES = {"uncompressed (Explicit VR LE)": "1.2.840.10008.1.2.1", "RLE Lossless": "1.2.840.10008.1.2.5",
            "JPEG-LS Lossless": "1.2.840.10008.1.2.4.80", "JPEG 2000 Lossless": "1.2.840.10008.1.2.4.90"}


def _film(rows: int, columns: int, window: bool) -> Any:
    """The pydicom dataset of the benchmark film (uncompressed)."""
    import numpy as np
    import pydicom
    from PIL import Image

    from tests.helpers.dicom_files import film_dicom, grey_film

    grey = grey_film(REPO / "sample_data" / "images" / "thnov10p5641g006-c.png")
    big = np.asarray(Image.fromarray(grey).resize((columns, rows), Image.Resampling.BICUBIC), np.float64)
    noisy = big * 257 + np.random.default_rng(0).normal(0, 64, big.shape)
    stored = np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(film_dicom(np.zeros((rows, columns), np.uint8), bits_stored=16,
                                                voi="window" if window else None)))
    ds.PixelData = stored.tobytes()
    return ds, stored


def _time(fn: Any, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 when every file decodes to the film's shape, else 1.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--columns", type=int, default=2000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import numpy as np
    import pydicom
    from pydicom.pixels import pixel_array

    from covid_tasks import dicom
    from covid_tasks.dicom_pixels import display_grey

    print(f"film: {args.columns} x {args.rows}, 16 bits stored, pydicom {pydicom.__version__}, "
          f"best and median of {args.repeat}")
    print()
    print("| transfer syntax | VOI | file MiB | decode_dicom s (median / best) | header s | pixels s "
          "| display s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    status = 0
    for window in (True, False):
        ds, stored = _film(args.rows, args.columns, window)
        for name, uid in SYNTAXES.items():
            film = ds.copy()
            if uid != SYNTAXES["uncompressed (Explicit VR LE)"]:
                film.compress(uid, stored, generate_instance_uid=False)
            buf = io.BytesIO()
            film.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
            image = dicom.decode_dicom(data, None)
            status |= int(image.shape != (args.rows, args.columns, 3))
            median, best = _time(lambda d=data: dicom.decode_dicom(d, None), args.repeat)
            header, _ = _time(lambda d=data: dicom.read_header(d), args.repeat)
            parsed = pydicom.dcmread(io.BytesIO(data))
            native = uid == SYNTAXES["uncompressed (Explicit VR LE)"]
            plugin = {} if native else {"decoding_plugin": "pylibjpeg"}
            pixels, _ = _time(lambda p=parsed, o=plugin: pixel_array(p, **o), args.repeat)
            arr = pixel_array(parsed, **plugin).astype(np.int64)
            display, _ = _time(lambda a=arr, p=parsed: display_grey(a, p, "MONOCHROME2", 16, False),
                               args.repeat)
            print(f"| {name} | {'window' if window else 'min-max'} | {len(data) / 2**20:.1f} | "
                  f"{median:.3f} / {best:.3f} | {header:.4f} | {pixels:.3f} | {display:.3f} |")
    return status


if __name__ == "__main__":
    sys.exit(main())
