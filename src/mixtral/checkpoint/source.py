"""Read-only views of checkpoint files: shapes without loading, tensors one at a time.

safetensors files are memory-mapped (safe_open), so a tensor costs memory only once it is copied into the model.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files or keys, wrong shapes, corrupt data."""


class SafetensorsSource:
    """Tensors spread over one or more .safetensors files, given as key -> file."""

    def __init__(self, weight_map: dict[str, str]) -> None:
        self.weight_map = weight_map
        self.files = sorted(set(weight_map.values()))
        self._handles: dict[str, object] = {}

    @classmethod
    def from_files(cls, files: list[str]) -> "SafetensorsSource":
        source = cls({})
        for path in files:
            for key in source._open(path).keys():
                source.weight_map[key] = path
        source.files = sorted(set(files))
        return source

    def _open(self, path: str):
        if path not in self._handles:
            if not os.path.isfile(path):
                raise CheckpointError(f"missing checkpoint file: {path}")
            try:
                self._handles[path] = safe_open(path, framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def release(self, path: str) -> None:
        """Close one file's memory map (reopened if read again); its pages leave RSS once no tensor aliases them."""
        self._handles.pop(path, None)

    def _slice(self, key: str):
        path = self.weight_map[key]
        try:
            return self._open(path).get_slice(key)
        except SafetensorError as e:  # e.g. an index that names a tensor its shard does not hold
            raise CheckpointError(f"cannot read {key!r} from {path}: {e}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype | None:
        return _SAFETENSORS_DTYPES.get(self._slice(key).get_dtype())

    def load(self, key: str) -> torch.Tensor:
        path = self.weight_map[key]
        try:
            return self._open(path).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {key!r} from {path} (truncated or corrupt?): {e}") from None

    def load_slice(self, key: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Only the elements of `index` (one slice per dim), read from the memory map: the rest of the tensor's
        pages are never touched."""
        path = self.weight_map[key]
        try:
            return self._slice(key)[index]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {key!r} from {path} (truncated or corrupt?): {e}") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class TensorDictSource:
    """Tensors already in a dict: a PyTorch file loaded with weights_only=True and mmap, or built in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor], files: list[str] | None = None) -> None:
        self.tensors = tensors
        self.files = files or []

    @classmethod
    def from_torch_file(cls, path: str) -> "TensorDictSource":
        """torch.load with weights_only=True: a pickle that holds anything but tensors is refused, never run."""
        if not os.path.isfile(path):
            raise CheckpointError(f"missing checkpoint file: {path}")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
            raise CheckpointError(f"cannot read {path} as a PyTorch weights file (weights_only=True): {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointError(f"{path} does not hold a flat dict of tensors")
        return cls(data, [path])

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def load(self, key: str) -> torch.Tensor:
        return self.tensors[key]
