"""Near-duplicate films: a 256-bit difference hash (dHash 16x16) and Hamming-distance linking.

The hash is ``imagehash.dhash(image, hash_size=16)``: the image in grey levels, resized to 17x16
pixels with Pillow's Lanczos filter, and one bit per pair of horizontally adjacent pixels (1 where
the right one is brighter), 16 rows x 16 bits, read row by row with the first bit most
significant. A hash is kept as a Python ``int`` (0 <= h < 2**256) or 64 hex digits.

Two films are near-duplicates when their hashes differ in at most ``max_distance`` bits.
``DEFAULT_MAX_DISTANCE`` (20) was chosen from the distances between the 724 images of the June
2020 set (docs/data-checks.md): the same film re-encoded, resized, or with a caption or arrows
drawn on it lies within 18 bits (one republished copy with another contrast and crop is at 21 and
is missed), while the nearest *different* films are 24 (two CT slices) and 26 (two chest X-rays)
apart. dHash does not survive cropping: 2% off each side moves a film by about 20 bits.

Grey levels: 8-bit images go through Pillow's ``convert("L")``; 16-bit ones (``I;16`` PNGs,
DICOM frames) are scaled by 255/65535 like the training decoder does, instead of Pillow's clipping.
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

if TYPE_CHECKING:
    import numpy as np
    from imagehash import ImageHash
    from PIL import Image

logger = logging.getLogger(__name__)

HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
#: Bits that may differ between two hashes of the same film. On the June 2020 set (724 images)
#: copies re-encoded or with a caption drawn in are 0-18 bits apart and different films 24 or more;
#: synthetic JPEG (quality 70) re-encodes stay within 11, half-size copies within 7.
DEFAULT_MAX_DISTANCE = 20
_WORDS = HASH_BITS // 64
_BLOCK = 512  # rows per block of the pairwise distance matrix
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

HashLike = Union[int, str, "ImageHash"]


def grey_image(image: "Image.Image") -> "Image.Image":
    """An 8-bit grey (``L``) copy of ``image``; 16-bit levels are scaled by 255/65535, not clipped.

    Args:
        image: a decoded Pillow image of any mode.

    Returns:
        A mode ``L`` image of the same size.
    """
    from PIL import Image

    if image.mode == "L":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        import numpy as np

        levels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), mode="L")
    return image.convert("L")


def dhash_image(image: "Image.Image") -> int:
    """The 256-bit difference hash of a decoded image.

    Args:
        image: a Pillow image (any mode; see :func:`grey_image`).

    Returns:
        The hash as an int (first bit most significant).
    """
    import imagehash

    return to_int(imagehash.dhash(grey_image(image), hash_size=HASH_SIZE))


def dhash_array(array: "np.ndarray") -> int:
    """The hash of a numpy image: ``(H, W)`` grey, or ``(H, W, 3|4)`` RGB(A), uint8 or uint16.

    Args:
        array: the pixels (a DICOM frame after windowing, a decoded tensor as numpy...).

    Returns:
        The hash as an int, equal to :func:`dhash_image` of the same pixels as a Pillow image.

    Raises:
        ValueError: another shape or dtype, or an empty image.
    """
    import numpy as np
    from PIL import Image

    arr = np.asarray(array)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise ValueError(f"expected an (H, W) or (H, W, 3|4) image array, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        if arr.ndim == 3:
            arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        grey = np.clip(np.rint(np.asarray(arr, dtype=np.float64) * (255.0 / 65535.0)), 0, 255)
        return dhash_image(Image.fromarray(grey.astype(np.uint8), mode="L"))
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image array, got dtype {arr.dtype}")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2] if arr.ndim == 3 else 2]
    return dhash_image(Image.fromarray(np.ascontiguousarray(arr), mode=mode))


def dhash_file(path: str | Path) -> int:
    """The hash of an image file, decoded with Pillow (a DICOM film with :mod:`covid_tasks.dicom`).

    A DICOM film is hashed on its display grey levels (window, MONOCHROME1 inverted), so it hashes
    like the PNG of the same film; Pillow's decompression-bomb limit applies to it too.

    Args:
        path: a JPEG, PNG, BMP, GIF or DICOM file.

    Returns:
        The hash as an int.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: Pillow cannot decode it (truncated, not an image, over Pillow's pixel limit).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} not found")
    from covid_tasks.dicom import DicomError, is_dicom

    if is_dicom(p):
        try:
            return dhash_array(dicom_grey(p))
        except DicomError as exc:
            raise ValueError(f"{p} is not a decodable image: {exc}") from None
    try:
        with Image.open(p) as img:
            img.load()
            return dhash_image(img)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"{p} is not a decodable image: {exc}") from None


def dicom_grey(path: Path) -> "np.ndarray":
    """A DICOM film's display grey levels (2-D uint8), held to the pixel limit Pillow holds the
    other formats to (its decompression-bomb error threshold).

    Raises:
        DicomError: the film is refused (over the limit included), with its reason.
    """
    from PIL import Image

    from covid_tasks.dicom import load_dicom

    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    return load_dicom(path, limit)[..., 0]


def hash_files(images_dir: str | Path, filenames: Iterable[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Hash many files; undecodable or missing ones are reported, not fatal.

    Args:
        images_dir: the folder the names are relative to (e.g. ``raw/images``).
        filenames: file names relative to ``images_dir``.

    Returns:
        ``(hashes, errors)``: ``{filename: hash}`` for the files that decode and
        ``{filename: reason}`` for the others (each also logged as a warning).
    """
    root = Path(images_dir)
    hashes: dict[str, int] = {}
    errors: dict[str, str] = {}
    for name in dict.fromkeys(filenames):
        try:
            hashes[name] = dhash_file(root / name)
        except (FileNotFoundError, ValueError) as exc:
            errors[name] = str(exc)
            logger.warning("near_duplicates: %s not hashed: %s", name, exc)
    return hashes, errors


def to_int(value: HashLike) -> int:
    """A hash as an int.

    Args:
        value: an int, 64 hex digits, or a 16x16 ``imagehash.ImageHash``.

    Returns:
        The 256-bit int.

    Raises:
        ValueError: not a 256-bit hash.
        TypeError: another type.
    """
    if isinstance(value, bool):
        raise TypeError("a hash is an int, a hex string or an ImageHash, not a bool")
    if isinstance(value, numbers.Integral):  # int, numpy integers
        out = int(value)
    elif isinstance(value, str):
        try:
            out = int(value, 16)
        except ValueError:
            raise ValueError(f"{value!r} is not a hex hash") from None
    elif hasattr(value, "hash") and getattr(value.hash, "size", None) is not None:
        if value.hash.size != HASH_BITS:
            raise ValueError(f"expected a {HASH_SIZE}x{HASH_SIZE} hash, got {value.hash.size} bits")
        out = int(str(value), 16)
    else:
        raise TypeError(f"cannot read a hash from {type(value).__name__}")
    if not 0 <= out < 1 << HASH_BITS:
        raise ValueError(f"hash {out:#x} is not a {HASH_BITS}-bit value")
    return out


def to_hex(value: HashLike) -> str:
    """A hash as 64 lower-case hex digits (``imagehash.hex_to_hash`` reads it back)."""
    return f"{to_int(value):0{HASH_BITS // 4}x}"


def hamming(a: HashLike, b: HashLike) -> int:
    """Bits that differ between two hashes."""
    return (to_int(a) ^ to_int(b)).bit_count()


def _matrix(values: list[int]) -> "np.ndarray":
    """``(n, 4)`` uint64 words, most significant first."""
    import numpy as np

    mask = (1 << 64) - 1
    return np.array([[(v >> (64 * k)) & mask for k in range(_WORDS - 1, -1, -1)] for v in values],
                    dtype=np.uint64).reshape(len(values), _WORDS)


def _distance_blocks(hashes: Mapping[str, HashLike]) -> Iterable[tuple[int, "np.ndarray"]]:
    """Yield ``(first row, int32 distances of rows [first, first + block) to every hash)``."""
    import numpy as np

    words = _matrix([to_int(h) for h in hashes.values()])
    for start in range(0, len(words), _BLOCK):
        rows = words[start:start + _BLOCK]
        dist = np.zeros((len(rows), len(words)), dtype=np.int32)
        for k in range(_WORDS):  # one 64-bit word at a time: 512 x n x 8 bytes at most
            dist += np.bitwise_count(rows[:, None, k] ^ words[None, :, k])
        yield start, dist


def near_duplicate_pairs(hashes: Mapping[str, HashLike],
                         max_distance: int = DEFAULT_MAX_DISTANCE) -> list[tuple[str, str, int]]:
    """Every pair of keys whose hashes differ in at most ``max_distance`` bits.

    Exact (all pairs, numpy popcount on 4 uint64 words per hash, in blocks of 512 rows): 5,000
    hashes take about a second and 50 MB.

    Args:
        hashes: ``{key: hash}``; keys are file names, sha256 digests, anything hashable and sortable.
        max_distance: the largest Hamming distance that links two keys (0..256).

    Returns:
        ``[(key_a, key_b, distance)]`` with ``key_a < key_b``, sorted by distance, then keys.

    Raises:
        ValueError: ``max_distance`` outside 0..256, or a value that is not a 256-bit hash.
    """
    import numpy as np

    if not 0 <= max_distance <= HASH_BITS:
        raise ValueError(f"max_distance must be within 0..{HASH_BITS}, got {max_distance}")
    keys = list(hashes)
    pairs: list[tuple[str, str, int]] = []
    for start, dist in _distance_blocks(hashes):
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if c > i:
                a, b = sorted((keys[i], keys[c]))
                pairs.append((a, b, int(dist[r, c])))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


def near_duplicate_groups(hashes: Mapping[str, HashLike],
                          max_distance: int = DEFAULT_MAX_DISTANCE) -> list[set[str]]:
    """Connected components of the near-duplicate pairs (groups of two keys or more).

    Linking is transitive: A~B and B~C put A, B and C in one group even when A and C are
    further apart than ``max_distance``.

    Args:
        hashes: ``{key: hash}``.
        max_distance: see :func:`near_duplicate_pairs`.

    Returns:
        The groups, each a set of keys, sorted by their smallest key; keys without a
        near-duplicate are in no group.

    Raises:
        ValueError: as :func:`near_duplicate_pairs`.
    """
    from covid_tasks.groups import group_members, link_groups

    pairs = near_duplicate_pairs(hashes, max_distance)
    keys = {key for a, b, _ in pairs for key in (a, b)}
    groups = {g: set(m) for g, m in group_members(link_groups(keys, [(a, b) for a, b, _ in pairs])).items()}
    return sorted(groups.values(), key=min)


def nearest_neighbours(hashes: Mapping[str, HashLike]) -> dict[str, tuple[str, int]]:
    """Each key's nearest other key and their distance (for histograms and threshold choice).

    Args:
        hashes: ``{key: hash}`` with at least two keys.

    Returns:
        ``{key: (nearest other key, distance)}``; ties go to the first key in ``hashes`` order.

    Raises:
        ValueError: fewer than two hashes.
    """
    import numpy as np

    if len(hashes) < 2:
        raise ValueError("nearest neighbours need at least two hashes")
    keys = list(hashes)
    out: dict[str, tuple[str, int]] = {}
    for start, dist in _distance_blocks(hashes):
        rows = np.arange(dist.shape[0])
        dist[rows, start + rows] = HASH_BITS + 1  # not oneself
        best = dist.argmin(axis=1)
        for r, c in enumerate(best.tolist()):
            out[keys[start + r]] = (keys[c], int(dist[r, c]))
    return out


def straddling_pairs(pairs: Iterable[tuple[str, str, int]], split_of: Mapping[str, Any]
                     ) -> list[tuple[str, str, int]]:
    """The near-duplicate pairs whose two keys sit in different splits.

    Args:
        pairs: from :func:`near_duplicate_pairs`.
        split_of: ``{key: split}`` (``train``/``val``/``test``). A key missing from it (a new
            image not yet assigned) has no split: paired with a test image it straddles, paired
            with another new image it does not.

    Returns:
        The pairs in the same order.
    """
    return [p for p in pairs if split_of.get(p[0]) != split_of.get(p[1])]
