"""Tests of covid_tasks.near_duplicates: the 256-bit dHash and Hamming-distance linking."""

from __future__ import annotations

import io
import random
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from covid_tasks import near_duplicates as nd

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "sample_data" / "images"


def reference_dhash(image: Image.Image) -> int:
    """dHash 16x16 written out: grey, 17x16 Lanczos, right pixel brighter -> 1, row by row, MSB first."""
    pixels = np.asarray(image.convert("L").resize((17, 16), Image.Resampling.LANCZOS), dtype=np.int32)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def film(seed: int, size: int = 256) -> Image.Image:
    """A synthetic film: smooth random structure (upsampled noise) and a bright body outline."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(40, 200, (12, 12), dtype=np.uint8), mode="L")
    img = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img += 40 * np.exp(-((xx - 0.5) ** 2 / 0.02 + (yy - 0.55) ** 2 / 0.08))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf)


def sample_films(n: int) -> list[Path]:
    files = sorted(SAMPLE_IMAGES.iterdir())
    return random.Random(0).sample(files, min(n, len(files)))


# --------------------------------------------------------------------------- the hash
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_dhash_matches_the_definition(mode: str) -> None:
    img = film(1, 200).convert(mode)
    assert nd.dhash_image(img) == reference_dhash(img.convert("L"))
    assert nd.to_int(imagehash.dhash(img, hash_size=16)) == nd.dhash_image(img)


def test_dhash_of_real_files_matches_the_definition() -> None:
    for path in sample_films(5):
        with Image.open(path) as img:
            assert nd.dhash_file(path) == reference_dhash(img)


def test_hash_forms_round_trip() -> None:
    h = nd.dhash_image(film(2))
    text = nd.to_hex(h)
    assert len(text) == 64 and int(text, 16) == h
    assert nd.to_int(imagehash.hex_to_hash(text)) == h
    assert nd.to_int(text) == h and nd.to_int(nd.to_hex(imagehash.hex_to_hash(text))) == h
    assert nd.hamming(h, text) == 0 and nd.hamming(h, h ^ 0b1011) == 3


@pytest.mark.parametrize("bad, error", [
    (True, TypeError),
    (3.0, TypeError),
    (1 << 256, ValueError),
    (-1, ValueError),
    ("xyz", ValueError),
])
def test_to_int_rejects(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        nd.to_int(bad)  # type: ignore[arg-type]


def test_to_int_rejects_other_hash_sizes() -> None:
    with pytest.raises(ValueError, match="16x16"):
        nd.to_int(imagehash.dhash(film(3), hash_size=8))


def test_dhash_array_equals_the_image_hash() -> None:
    grey = np.asarray(film(4))
    assert nd.dhash_array(grey) == nd.dhash_image(Image.fromarray(grey))
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=2)
    assert nd.dhash_array(rgb) == nd.dhash_image(Image.fromarray(rgb, mode="RGB"))
    rgba = np.concatenate([rgb, np.full(grey.shape + (1,), 255, np.uint8)], axis=2)
    assert nd.dhash_array(rgba) == nd.dhash_array(rgb)
    # 16 bits: the same levels times 257 hash the same (scaled, not clipped to white)
    assert nd.dhash_array(grey.astype(np.uint16) * 257) == nd.dhash_array(grey)


@pytest.mark.parametrize("bad", [np.zeros((4,), np.uint8), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((0, 5), np.uint8), np.zeros((8, 8), np.float32)])
def test_dhash_array_rejects(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected"):
        nd.dhash_array(bad)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    grey = np.asarray(film(5))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
        clipped = nd.to_int(imagehash.dhash(img.convert("L"), hash_size=16))  # Pillow clips to 255
    assert nd.dhash_file(tmp_path / "deep.png") == nd.dhash_array(grey)
    assert nd.hamming(clipped, nd.dhash_array(grey)) > nd.DEFAULT_MAX_DISTANCE


def test_hash_files_reports_bad_files(tmp_path: Path) -> None:
    film(6).save(tmp_path / "good.png")
    data = io.BytesIO()
    film(7).save(data, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(data.getvalue()[:200])
    (tmp_path / "text.jpg").write_text("not an image")
    hashes, errors = nd.hash_files(tmp_path, ["good.png", "truncated.jpg", "text.jpg", "missing.png",
                                              "good.png"])
    assert list(hashes) == ["good.png"]
    assert sorted(errors) == ["missing.png", "text.jpg", "truncated.jpg"]
    assert "not found" in errors["missing.png"] and "not a decodable image" in errors["text.jpg"]


# --------------------------------------------------------------------------- copies and different films
TRANSFORMS = {
    "jpeg q70": lambda im: jpeg(im, 70),
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "double size": lambda im: im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC),
    "brightness x0.9": lambda im: ImageEnhance.Brightness(im.convert("L")).enhance(0.9),
    "10 levels brighter": lambda im: im.convert("L").point(lambda v: min(255, v + 10)),
    "jpeg q70 of half size": lambda im: jpeg(im.resize((im.width // 2, im.height // 2)), 70),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_copies_are_linked(name: str) -> None:
    """Every sample film and its re-encoded/resized/brightened copy end up in one group."""
    hashes = {}
    for path in sample_films(25):
        with Image.open(path) as img:
            img.load()
            hashes[path.name] = nd.dhash_image(img)
            hashes["copy-" + path.name] = nd.dhash_image(TRANSFORMS[name](img))
    groups = nd.near_duplicate_groups(hashes)
    assert sorted(sorted(g) for g in groups) == sorted(
        sorted([k, "copy-" + k]) for k in hashes if not k.startswith("copy-"))


def test_different_films_are_not_linked() -> None:
    """The sample set's films (follow-ups of one patient included) are all further apart."""
    hashes, errors = nd.hash_files(SAMPLE_IMAGES, sorted(p.name for p in SAMPLE_IMAGES.iterdir()))
    assert not errors and len(hashes) > 90
    assert nd.near_duplicate_groups(hashes) == []
    assert min(d for _, d in nd.nearest_neighbours(hashes).values()) > nd.DEFAULT_MAX_DISTANCE
    synthetic = {f"film-{s}": nd.dhash_image(film(s)) for s in range(20)}
    assert nd.near_duplicate_pairs(synthetic) == []


# --------------------------------------------------------------------------- pairs and groups
def all_distances(hashes: dict[str, int]) -> list[tuple[str, str, int]]:
    keys = list(hashes)
    return [(*sorted((a, b)), (hashes[a] ^ hashes[b]).bit_count())
            for i, a in enumerate(keys) for b in keys[i + 1:]]


def brute_force(distances: list[tuple[str, str, int]], max_distance: int) -> list[tuple[str, str, int]]:
    return sorted((p for p in distances if p[2] <= max_distance), key=lambda p: (p[2], p[0], p[1]))


def flip(value: int, bits: list[int]) -> int:
    for b in bits:
        value ^= 1 << b
    return value


def test_pairs_equal_brute_force_across_blocks() -> None:
    """1,100 hashes (three row blocks) with planted near pairs: the same pairs as a plain loop."""
    rng = random.Random(7)
    hashes = {f"k{i:04d}": rng.getrandbits(256) for i in range(1000)}
    for i in range(100):
        src = hashes[f"k{rng.randrange(1000):04d}"]
        hashes[f"n{i:03d}"] = flip(src, rng.sample(range(256), rng.randrange(0, 40)))
    distances = all_distances(hashes)
    for max_distance in (0, 5, 20, 39):
        assert nd.near_duplicate_pairs(hashes, max_distance) == brute_force(distances, max_distance)
    nearest = nd.nearest_neighbours(hashes)
    for key in ("k0000", "n000", "n099"):
        best = min((hashes[key] ^ v).bit_count() for k, v in hashes.items() if k != key)
        assert nearest[key][1] == best
        assert (hashes[key] ^ hashes[nearest[key][0]]).bit_count() == best


def test_groups_are_connected_components() -> None:
    a = random.Random(1).getrandbits(256)
    b = flip(a, list(range(15)))  # 15 from a
    c = flip(b, list(range(100, 115)))  # 15 from b, 30 from a: linked through b
    far = a ^ ((1 << 256) - 1)
    d = flip(far, [3])
    hashes = {"a": a, "b": b, "c": c, "far": far, "d": d, "alone": flip(a, list(range(128, 256)))}
    assert nd.near_duplicate_groups(hashes, 20) == [{"a", "b", "c"}, {"d", "far"}]
    assert nd.near_duplicate_groups(hashes, 10) == [{"d", "far"}]
    assert nd.near_duplicate_pairs(hashes, 20) == [("d", "far", 1), ("a", "b", 15), ("b", "c", 15)]
    assert nd.near_duplicate_groups({}, 20) == [] and nd.near_duplicate_pairs({"x": a}) == []


def test_pairs_accept_imagehash_and_hex_values() -> None:
    img = film(9)
    hashes = {"img": imagehash.dhash(img, hash_size=16), "hex": nd.to_hex(nd.dhash_image(jpeg(img, 70))),
              "int": nd.dhash_image(film(10))}
    assert [p[:2] for p in nd.near_duplicate_pairs(hashes)] == [("hex", "img")]


@pytest.mark.parametrize("bad", [-1, 257])
def test_max_distance_range(bad: int) -> None:
    with pytest.raises(ValueError, match="max_distance"):
        nd.near_duplicate_pairs({"a": 1, "b": 2}, bad)


def test_nearest_needs_two() -> None:
    with pytest.raises(ValueError, match="two"):
        nd.nearest_neighbours({"a": 1})


def test_straddling_pairs() -> None:
    pairs = [("a", "b", 1), ("c", "d", 2), ("e", "new", 3), ("new", "new2", 4)]
    split_of = {"a": "train", "b": "train", "c": "train", "d": "test", "e": "test"}
    assert nd.straddling_pairs(pairs, split_of) == [("c", "d", 2), ("e", "new", 3)]


def test_images_over_pillows_pixel_limit_are_reported(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    film(8, 300).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    hashes, errors = nd.hash_files(tmp_path, ["huge.png"])
    assert hashes == {} and "not a decodable image" in errors["huge.png"]


def test_numpy_integers_are_hashes() -> None:
    assert nd.to_int(np.uint64(5)) == 5 and nd.hamming(np.int64(3), 0) == 2
