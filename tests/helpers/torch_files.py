"""Write PyTorch state-dict files (legacy and zip layouts) with pickle alone, torch not needed."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest


def fake_torch(monkeypatch: pytest.MonkeyPatch) -> tuple[type, types.FunctionType]:
    """Install stand-ins for ``torch.FloatStorage`` and ``_rebuild_tensor_v2`` so pickle can name them."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:  # noqa: D401 - a name for pickle, nothing else
        pass

    def _rebuild_tensor_v2(*args):  # pragma: no cover - never called, only referenced
        raise AssertionError

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch_mod.FloatStorage, utils_mod._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    torch_mod._utils = utils_mod
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)
    return FloatStorage, _rebuild_tensor_v2


class Tensor:
    """A tensor to pickle: a view of storage ``key``; ``shape``/``stride`` may lie (hostile files)."""

    def __init__(self, key: str, array: np.ndarray, offset: int = 0, stride: tuple[int, ...] | None = None,
                 shape: tuple[int, ...] | None = None):
        self.key, self.array, self.offset = key, array, offset
        self.stride = tuple(s // array.itemsize for s in array.strides) if stride is None else stride
        self.shape = array.shape if shape is None else shape


def write_torch_file(path: Path, tensors: dict[str, Tensor], storages: dict[str, np.ndarray],
                      fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write a state dict the way ``torch.save`` lays it out (legacy or zip), using only pickle."""
    storage_cls, rebuild = fake_torch(monkeypatch)

    class _Ref:
        def __init__(self, key: str) -> None:
            self.key = key

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):  # noqa: ANN001
            if isinstance(obj, _Ref):
                numel = storages[obj.key].size
                return ("storage", storage_cls, obj.key, "cpu", numel) + ((None,) if fmt == "legacy" else ())
            return None

        def reducer_override(self, obj):  # noqa: ANN001
            if isinstance(obj, Tensor):
                return rebuild, (_Ref(obj.key), obj.offset, obj.shape, obj.stride, False,
                                 collections.OrderedDict())
            return NotImplemented

    def dumps(obj: object) -> bytes:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()

    state = collections.OrderedDict(tensors)
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", dumps(state))
            for key, arr in storages.items():
                zf.writestr(f"archive/data/{key}", arr.astype("<f4").tobytes())
        return
    with open(path, "wb") as fh:
        fh.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        fh.write(pickle.dumps(1001, protocol=2))
        fh.write(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
        fh.write(dumps(state))
        fh.write(pickle.dumps(list(storages), protocol=2))
        for arr in storages.values():
            fh.write(struct.pack("<q", arr.size) + arr.astype("<f4").tobytes())
