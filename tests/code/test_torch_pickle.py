"""The torch-free ``.pth`` reader refuses tensors that reach past their storage or are too big."""

from __future__ import annotations

import resource
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from covid_tasks.torch_pickle import TorchFileError, load_state_dict
from tests.helpers.torch_files import Tensor, write_torch_file

FORMATS = ["legacy", "zip"]


def _write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, tensor: Tensor,
           storage: np.ndarray) -> Path:
    path = tmp_path / f"hostile-{fmt}.pth"
    write_torch_file(path, {"w": tensor}, {"0": storage}, fmt, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch")  # the reader must not need it
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("offset", "shape", "stride", "match"), [
    (0, (4096,), (1,), "reach element 4095 of storage 0, which holds 4 element"),    # read past the end
    (3, (2,), (1,), "reach element 4 of storage 0, which holds 4 element"),          # offset + size
    (5, (), (), "offset 5 is outside storage 0, which holds 4 element"),               # a scalar past the end
    (0, (2, 2), (3, 1), "reach element 4 of storage 0, which holds 4 element"),      # a stride too long
    (-1, (2,), (1,), "negative offset"),
    (0, (-2,), (1,), "negative size"),
    (0, (2,), (-1,), "negative stride"),
])
def test_tensor_outside_its_storage_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str,
                                               offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                                               match: str) -> None:
    """A file with only allowed globals once returned memory past the storage (heap contents)."""
    storage = np.arange(4, dtype="float32")
    path = _write(tmp_path, monkeypatch, fmt, Tensor("0", storage, offset, stride, shape), storage)
    with pytest.raises(TorchFileError, match=match):
        load_state_dict(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_huge_tensor_is_refused_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  fmt: str) -> None:
    """Size 2^28 over one element with stride 0 is in bounds, but would allocate 1 GiB."""
    storage = np.ones(1, dtype="float32")
    path = _write(tmp_path, monkeypatch, fmt, Tensor("0", storage, 0, (0,), (2**28,)), storage)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TorchFileError, match=r"268435456 elements .* more than the limit"):
        load_state_dict(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no 1 GiB array


@pytest.mark.parametrize("fmt", FORMATS)
def test_storage_size_must_match_its_declaration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fmt: str) -> None:
    storage = np.arange(4, dtype="float32")
    path = _write(tmp_path, monkeypatch, fmt, Tensor("0", storage), storage)
    raw = path.read_bytes()
    if fmt == "legacy":  # the int64 element count before the bytes claims far more than the file has
        count = np.int64(4).tobytes()
        at = raw.rindex(count + storage.tobytes())
        path.write_bytes(raw[:at] + np.int64(2**40).tobytes() + raw[at + 8:])
        match = "storage 0 declares 1099511627776 elements"
    else:  # the archive's storage holds more bytes than its pickle declares
        with zipfile.ZipFile(path) as zf:
            entries = {n: zf.read(n) for n in zf.namelist()}
        entries["archive/data/0"] = np.arange(6, dtype="float32").tobytes()
        with zipfile.ZipFile(path, "w") as zf:
            for name, blob in entries.items():
                zf.writestr(name, blob)
        match = r"storage 0 holds 24 bytes, its pickle declares 4 elements \(16 bytes\)"
    with pytest.raises(TorchFileError, match=match):
        load_state_dict(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_in_bounds_views_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    storage = np.arange(12, dtype="float32")
    path = _write(tmp_path, monkeypatch, fmt, Tensor("0", storage, 2, (1, 3), (3, 3)), storage)
    np.testing.assert_array_equal(load_state_dict(path)["w"], storage[2:11].reshape(3, 3).T)
