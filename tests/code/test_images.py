"""Input pipeline: decoding, labels, caching and augmentation on tiny synthetic images."""

from __future__ import annotations

import fcntl
import io
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from covid_tasks import augment, dataset, images
from covid_tasks.config import MAX_IMAGE_PIXELS, Config
from tests.helpers.images import png_header, rle8_bmp

SIZE = 8  # decoding tests
PIPE = 32  # Config.img_size minimum


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _decode(contents: bytes, size: int = SIZE) -> np.ndarray:
    return images.decode_image(tf.constant(contents), size).numpy()


def _write_constant_images(root: Path, values: dict[str, int], size: int = SIZE, fmt: str = "PNG") -> None:
    for name, value in values.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format=fmt)


# ----------------------------------------------------------------------------- decoding
GREY = np.array([[0, 37, 100, 255]] * 4, np.uint8).repeat(2, axis=0).repeat(2, axis=1)[:SIZE, :SIZE]


@pytest.mark.parametrize("kind", ["grey", "grey_alpha", "palette", "grey16", "rgb16", "rgba"])
def test_png_variants_decode_to_expected_rgb(kind: str) -> None:
    rgb = np.stack([GREY, GREY // 2, 255 - GREY], axis=-1)
    if kind == "grey":
        contents, expected = _png(GREY), np.stack([GREY] * 3, -1)
    elif kind == "grey_alpha":
        contents, expected = _png(np.stack([GREY, np.full_like(GREY, 9)], -1), "LA"), np.stack([GREY] * 3, -1)
    elif kind == "palette":
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="PNG")
        contents, expected = buf.getvalue(), np.asarray(Image.open(buf).convert("RGB"))
    elif kind == "grey16":  # 16-bit levels v * 257 are 8-bit level v exactly
        contents = tf.io.encode_png(tf.constant(GREY[..., None].astype(np.uint16) * 257)).numpy()
        expected = np.stack([GREY] * 3, -1)
    elif kind == "rgb16":
        contents, expected = tf.io.encode_png(tf.constant(rgb.astype(np.uint16) * 257)).numpy(), rgb
    else:
        contents, expected = _png(np.concatenate([rgb, np.full_like(GREY, 40)[..., None]], -1), "RGBA"), rgb
    out = _decode(contents)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_16bit_png_keeps_its_precision_as_rounded_8bit_levels() -> None:
    levels = np.array([[0, 128, 32768, 40000, 65535, 257, 300, 1000]] * SIZE, np.uint16)
    out = _decode(tf.io.encode_png(tf.constant(levels[..., None])).numpy())
    np.testing.assert_array_equal(out[..., 0], np.round(levels * 255.0 / 65535.0))


def test_jpeg_decodes_like_pillow_and_is_resized() -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    noise = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=80)
    pillow = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float32)
    np.testing.assert_array_equal(_decode(buf.getvalue()), pillow)
    grey = io.BytesIO()
    Image.fromarray(GREY).save(grey, format="JPEG", quality=95)
    big = _decode(grey.getvalue(), size=16)
    assert big.shape == (16, 16, 3) and np.array_equal(big[..., 0], big[..., 2])


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        images.load_image(tmp_path / "missing.png", SIZE)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not a decodable"):
        images.load_image(bad, SIZE)


def _encoded(fmt: str, size: tuple[int, int] = (37, 23), **kw: object) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("contents", [
    _encoded("PNG"), _encoded("JPEG"), _encoded("JPEG", progressive=True), _encoded("BMP"), _encoded("GIF"),
    _encoded("JPEG", exif=b"Exif\x00\x00" + b"\x00" * 5000), rle8_bmp(np.zeros((23, 37), np.uint8)),
], ids=["png", "jpeg", "progressive", "bmp", "gif", "exif", "rle8"])
def test_image_size_reads_the_header_only(contents: bytes, tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(contents)
    assert images.image_size(contents) == images.image_size(tmp_path / "x") == (37, 23)
    header = contents[:5400] if b"Exif" in contents[:64] else contents[:600]  # no pixel data needed
    assert images.image_size(header) == (37, 23)


@pytest.mark.parametrize("contents, match", [
    (b"", "empty"), (png_header(9, 9)[:20], "truncated"), (b"GIF8", "not a JPEG, PNG, DICOM, BMP or GIF"),
    (b"\xff\xd8\xff\xd9", "without a frame"),
    (_encoded("TIFF"), "not a JPEG, PNG, DICOM, BMP or GIF"), (png_header(0, 5), "0x5"),
], ids=["empty", "cut-png", "cut-gif", "jpeg-no-frame", "tiff", "zero-width"])
def test_image_size_refuses_what_the_decoder_cannot_read(contents: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        images.image_size(contents)


def test_load_image_refuses_a_bomb_before_decoding(tmp_path: Path) -> None:
    """A 31 KB PNG declaring 16000 x 16000 once took 8 GB in ``predict``; now a header read."""
    for width, height in ((16000, 16000), (8000, 7000)):
        bomb = tmp_path / f"bomb-{width}.png"
        bomb.write_bytes(png_header(width, height))
        t0 = time.monotonic()
        too_large = f"{width}x{height}.*over the limit of {MAX_IMAGE_PIXELS}"
        with pytest.raises(images.ImageTooLargeError, match=too_large):
            images.load_image(bomb, SIZE)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(ValueError):  # a ValueError for callers that catch those
            images.load_image_bytes(bomb.read_bytes(), SIZE)
    ok = tmp_path / "ok.png"
    ok.write_bytes(_encoded("PNG"))
    with pytest.raises(images.ImageTooLargeError) as err:
        images.load_image(ok, SIZE, max_pixels=100)
    assert (err.value.width, err.value.height, err.value.max_pixels) == (37, 23, 100)
    assert images.load_image(ok, SIZE, max_pixels=None).shape == (SIZE, SIZE, 3)


# ----------------------------------------------------------------------------- labels
def test_label_index_and_class_weights() -> None:
    np.testing.assert_array_equal(dataset.label_index(["covid", "non_covid", "covid"]), [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="unknown label 'COVID-19'"):
        dataset.label_index(["covid", "COVID-19"])
    assert dataset.class_weights([0, 0, 0, 1]) == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}
    assert dataset.class_weights([1, 1]) == {0: 1.0, 1: 0.5}  # an absent class gets 1.0


@pytest.mark.parametrize("order", ["as_written", "reversed", "shuffled"])
def test_labels_follow_the_class_list_whatever_the_folder_or_row_order(tmp_path: Path, order: str) -> None:
    # covid images sit in the folder that sorts first, so folder order would make covid class 0.
    values = {f"a_covid/c{i}.png": 10 + i for i in range(5)}
    values |= {f"b_non_covid/n{i}.png": 100 + i for i in range(5)}
    _write_constant_images(tmp_path, values)
    frame = pd.DataFrame({"filename": list(values), "label": ["covid"] * 5 + ["non_covid"] * 5})
    if order == "reversed":
        frame = frame.iloc[::-1]
    elif order == "shuffled":
        frame = frame.sample(frac=1.0, random_state=3)
    cfg = Config(data_root=str(tmp_path), img_size=PIPE, batch_size=3)
    pixels, labels = [], []
    for x, y in dataset.make_dataset(frame, tmp_path, cfg, training=False):
        pixels.extend(x.numpy()[:, 0, 0, 0].tolist())
        labels.extend(y.numpy().tolist())
    assert pixels == [float(values[f]) for f in frame["filename"]]  # evaluation keeps row order
    assert labels == [1.0 if v < 100 else 0.0 for v in pixels]  # covid is 1.0 by the class list


def _unusable_set(tmp_path: Path) -> tuple[pd.DataFrame, Config]:
    """Six good 32 px images and three unusable ones: RLE8 BMP, truncated PNG, over the pixel limit."""
    _write_constant_images(tmp_path, {f"ok{i}.png": 20 * i for i in range(6)}, size=PIPE)
    (tmp_path / "rle8.bmp").write_bytes(rle8_bmp(np.full((PIPE, PIPE), 77, np.uint8)))
    (tmp_path / "cut.png").write_bytes(_png(np.full((PIPE, PIPE), 5, np.uint8))[:60])
    _write_constant_images(tmp_path, {"big.png": 9}, size=2 * PIPE)
    names = ["ok0.png", "rle8.bmp", "ok1.png", "ok2.png", "big.png", "ok3.png", "ok4.png", "ok5.png",
             "cut.png"]
    frame = pd.DataFrame({"filename": names, "label": ["covid", "non_covid"] * 4 + ["covid"]})
    return frame, Config(data_root=str(tmp_path), img_size=PIPE, batch_size=4, max_image_pixels=PIPE * PIPE)


def test_unusable_images_are_named_and_skipped_when_training(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """An RLE8 BMP once crashed ``train`` inside TensorFlow without naming the file."""
    frame, cfg = _unusable_set(tmp_path)
    caplog.set_level("WARNING", logger="covid_tasks.dataset")
    for _ in range(2):  # the second epoch reads the cache
        seen = [x for x, _y in dataset.make_dataset(frame, tmp_path, cfg, training=True)]
        assert sum(len(x) for x in seen) == 6
    text = caplog.text
    assert "big.png is 64x64 = 4096 pixels, over the limit of 1024" in text
    assert "rle8.bmp" in text and "cut.png" in text and "cannot be decoded" in text


def test_unusable_images_fail_evaluation_naming_them(tmp_path: Path) -> None:
    frame, cfg = _unusable_set(tmp_path)
    with pytest.raises(ValueError, match=r"1 of 9 image\(s\) cannot be used: .*big.png is 64x64"):
        dataset.make_dataset(frame, tmp_path, cfg, training=False)
    decodable_header = frame[frame["filename"] != "big.png"]
    ds = dataset.make_dataset(decodable_header, tmp_path, cfg, training=False)
    with pytest.raises(tf.errors.OpError, match=r"cannot be decoded: .*rle8.bmp: .*Input size should match"):
        list(ds)
    good = frame[frame["filename"].str.startswith("ok")]
    ds = dataset.make_dataset(good, tmp_path, cfg, training=False)
    values = [v for x, _ in ds for v in x.numpy()[:, 0, 0, 0]]
    assert values == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]  # row order kept


def test_missing_image_fails_early(tmp_path: Path) -> None:
    frame = pd.DataFrame({"filename": ["nope.png"], "label": ["covid"]})
    with pytest.raises(FileNotFoundError, match="missing"):
        dataset.make_dataset(frame, tmp_path, Config(data_root=str(tmp_path), img_size=PIPE), training=False)


# ----------------------------------------------------------------------------- caching
def _cached_setup(tmp_path: Path) -> tuple[pd.DataFrame, Config, int]:
    values = {f"img{i}.bmp": 3 * i for i in range(6)}  # BMP: a file's size does not depend on its pixels
    _write_constant_images(tmp_path / "images", values, fmt="BMP")
    frame = pd.DataFrame({"filename": list(values), "label": ["covid", "non_covid"] * 3})
    one_image = PIPE * PIPE * 3
    return frame, Config(data_root=str(tmp_path), img_size=PIPE, batch_size=4), one_image


def _first_pixels(ds: tf.data.Dataset) -> list[float]:
    return [float(v) for x, _ in ds for v in x.numpy()[:, 0, 0, 0]]


def test_large_set_is_cached_on_disk_and_reused_until_files_change(tmp_path: Path) -> None:
    frame, cfg, one_image = _cached_setup(tmp_path)
    cache = tmp_path / "cache"
    make = lambda: dataset.make_dataset(frame, tmp_path / "images", cfg, training=False,  # noqa: E731
                                     cache_dir=cache, memory_limit=2 * one_image)
    assert _first_pixels(make()) == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]
    (folder,) = cache.iterdir()
    assert (folder / "images.index").is_file()

    # The same rows read the complete cache, not the files: a byte-identical rewrite with an old
    # mtime keeps the key, so the cache's values come back even though the file now differs.
    target = tmp_path / "images" / "img0.bmp"
    stat = target.stat()
    _write_constant_images(tmp_path / "images", {"img0.bmp": 200}, fmt="BMP")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size
    assert _first_pixels(make())[0] == 0.0
    # A changed file (new mtime) is a new key: fresh values, a second cache folder.
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _first_pixels(make())[0] == 200.0
    assert len(list(cache.iterdir())) == 2


def _cache_folder(cache: Path, images: Path, frame: pd.DataFrame) -> Path:
    """Create and return the file-cache folder make_dataset will use for ``frame``."""
    paths = [str(images / f) for f in frame["filename"]]
    folder = cache / dataset._cache_key(paths, dataset.label_index(frame["label"]), PIPE)
    folder.mkdir(parents=True)
    return folder


def test_a_killed_runs_partial_cache_does_not_break_the_next_run(tmp_path: Path) -> None:
    frame, cfg, one_image = _cached_setup(tmp_path)
    cache = tmp_path / "cache"
    folder = _cache_folder(cache, tmp_path / "images", frame)
    # What TensorFlow leaves when the writing process is killed: its lockfile and a temp shard.
    (folder / "images_0.lockfile").write_text("Created at: 1")
    (folder / "images_0.data-00000-of-00001.tempstate123").write_bytes(b"partial")
    ds = dataset.make_dataset(frame, tmp_path / "images", cfg, training=False, cache_dir=cache,
                           memory_limit=one_image)
    assert _first_pixels(ds) == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]
    assert (folder / "images.index").is_file() and not (folder / "images_0.lockfile").exists()


def test_new_file_cache_prunes_old_unused_ones(tmp_path: Path) -> None:
    frame, cfg, one_image = _cached_setup(tmp_path)
    cache = tmp_path / "cache"
    old, recent = cache / "32px-9-0123456789abcdef0123", cache / "32px-9-aaaaaaaaaaaaaaaaaaaa"
    other = cache / "not-a-cache"
    for folder in (old, recent, other):
        folder.mkdir(parents=True)
        (folder / "images.index").write_bytes(b"x")
    month_ago = time.time() - 30 * 24 * 3600
    for folder in (old, other):
        os.utime(folder, (month_ago, month_ago))
    dataset.make_dataset(frame, tmp_path / "images", cfg, training=False, cache_dir=cache,
                      memory_limit=one_image)
    assert not old.exists() and recent.exists() and other.exists()


def test_cache_written_by_another_live_process_is_left_alone(tmp_path: Path) -> None:
    frame, cfg, one_image = _cached_setup(tmp_path)
    cache = tmp_path / "cache"
    folder = _cache_folder(cache, tmp_path / "images", frame)
    (folder / "images_0.lockfile").write_text("Created at: 1")
    with open(folder / "writer.lock", "a") as other_writer:  # a separate open file: a second owner
        fcntl.flock(other_writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ds = dataset.make_dataset(frame, tmp_path / "images", cfg, training=False, cache_dir=cache,
                               memory_limit=one_image)
        assert _first_pixels(ds) == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]
        assert (folder / "images_0.lockfile").exists() and not (folder / "images.index").exists()


# ----------------------------------------------------------------------------- augmentation
def test_augment_is_seeded_light_and_never_flips_vertically() -> None:
    img = np.zeros((16, 32, 32, 3), np.float32)
    img[:, :12] = 200.0  # a bright top band: a vertical flip would move it to the bottom
    batch = tf.constant(img)
    a = augment.augment(batch, tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal(a, augment.augment(batch, tf.constant([1, 2])).numpy())
    assert not np.allclose(a, augment.augment(batch, tf.constant([3, 4])).numpy())
    assert a.shape == img.shape and a.min() >= 0.0 and a.max() <= 255.0
    assert not np.allclose(a[0], a[1])  # one draw per image, not per batch
    top, bottom = a[:, :8].mean(axis=(1, 2, 3)), a[:, -8:].mean(axis=(1, 2, 3))
    assert np.all(top > 150.0) and np.all(bottom < 30.0)


def test_augment_strength_scales_the_ranges_and_zero_turns_it_off() -> None:
    x = np.random.default_rng(2).integers(0, 256, (32, 24, 24, 3)).astype(np.float32)
    batch, seed = tf.constant(x), tf.constant([5, 6])
    np.testing.assert_array_equal(augment.augment(batch, seed, 0.0).numpy(), x)
    moved = {k: float(np.abs(augment.augment(batch, seed, k).numpy() - x).mean()) for k in (0.5, 1.0, 2.0)}
    assert 0.0 < moved[0.5] < moved[1.0] < moved[2.0]


def test_augment_resamples_like_tensorflows_projective_transform() -> None:
    """The XLA resampler gives ImageProjectiveTransformV3's bilinear, edge-extended output."""
    x = tf.constant(np.random.default_rng(5).integers(0, 256, (3, 20, 24, 3)).astype(np.uint8))
    c, s = np.cos(np.deg2rad(7.0)) / 1.05, np.sin(np.deg2rad(7.0)) / 1.05  # rotate, zoom, then shift
    affine = tf.constant([[c, s, 1.3, -s, c, -0.7]] * 3, tf.float32)
    gain = tf.constant([0.9, 1.0, 1.1])
    ours = augment._warp_fn()(x, affine, gain).numpy()
    assert float(np.abs(ours - x.numpy()).mean()) > 5.0  # the transform did move pixels
    np.testing.assert_allclose(ours, augment._warp_kernel(x, affine, gain).numpy(), rtol=0, atol=1e-2)


def test_training_set_is_shuffled_augmented_and_reproducible(tmp_path: Path) -> None:
    # Levels 25% apart stay identifiable under the +-10% brightness change.
    levels = [round(10 * 1.25**i) for i in range(12)]
    values = {f"img{i}.png": v for i, v in enumerate(levels)}
    _write_constant_images(tmp_path, values, size=PIPE)
    frame = pd.DataFrame({"filename": list(values), "label": ["covid", "non_covid"] * 6})
    cfg = Config(data_root=str(tmp_path), img_size=PIPE, batch_size=4)

    def two_epochs() -> list[np.ndarray]:
        ds = dataset.make_dataset(frame, tmp_path, cfg, training=True)
        return [np.concatenate([x.numpy() for x, _ in ds]) for _ in range(2)]

    first, second = two_epochs()
    centre = first[:, PIPE // 2, PIPE // 2, 0]
    order = [int(np.argmin(np.abs(np.log(c) - np.log(levels)))) for c in centre]
    assert sorted(order) == list(range(12)) and order != list(range(12))  # every image once, shuffled
    assert not np.allclose(centre, [levels[i] for i in order])  # brightness changed
    assert not np.allclose(first, second)  # reshuffled and re-augmented each epoch
    again = two_epochs()
    np.testing.assert_array_equal(first, again[0])  # same seed, same data: the same batches
    np.testing.assert_array_equal(second, again[1])
