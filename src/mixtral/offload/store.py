"""Experts kept on disk, one file per layer, each expert's tensors contiguous: one thread reads an expert into a slot
front to back, in large pieces.

Layout of `layer_{l}.bin`: expert e's record starts at e * record_bytes and holds the expert's tensors (`fields`:
the pool's per-expert tensors, e.g. gate_up_proj and down_proj, or their int4 buffers) back to back, padded to
4 KiB. A field may be written for every expert at once, in any order of fields (loading reads gate_up_proj and
down_proj at different times). `manifest.json`, written last, says what the files hold and what they were made
from, so that a store that matches is used again without reading the checkpoint's experts.

Reads go through the page cache and release it at once (posix_fadvise DONTNEED), and writes are flushed and
released too: the kernel keeps no second copy of the experts beside the pool, so that the process's memory, page
cache included, stays within what the pool holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..checkpoint.source import CheckpointError

ALIGN = 4096
# Largest single read. An expert's record (99 MB in 8x7B's Q4_0) is read front to back in pieces of this size by
# one thread (read_expert), each piece's page cache released after it: the kernel's readahead sees one sequential
# stream and keeps the disk's queue full, while the page cache in flight stays within about 2 pieces an expert.
# Measured on this machine's disk, random 8x7B experts, page cache dropped, 3 trials each: 8 MiB pieces in order,
# 2-4 experts in flight: 2.1-2.2 GB/s; one read an expert: 2.0-2.4 (the whole expert in the page cache at once);
# the same 8 MiB pieces spread over 8 threads out of order: 1.1-1.35; O_DIRECT, 2-4 MiB pieces, 16 in flight:
# 1.3-1.65.
PIECE = 8 << 20
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Field:
    name: str  # the experts module's tensor: "gate_up_proj", "down_proj_packed", ...
    shape: tuple[int, ...]  # one expert's
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * _dtype(self.dtype).itemsize


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def fields_of(experts: torch.nn.Module) -> list[Field]:
    """The per-expert tensors of an experts module (stacked, leading dim num_experts), in state-dict order."""
    return [Field(name, tuple(t.shape[1:]), str(t.dtype).removeprefix("torch."))
            for name, t in experts.state_dict(keep_vars=True).items()]


def _bytes(t: torch.Tensor) -> Any:
    """A contiguous CPU tensor's memory as a writable buffer (numpy has no bfloat16: bytes, not values)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class ExpertStore:
    """The experts of `num_layers` layers x `num_experts`, in `folder`; see the module's docstring."""

    def __init__(self, folder: str | os.PathLike, fields: list[Field], num_layers: int, num_experts: int,
                 source: dict[str, Any]) -> None:
        self.folder, self.fields = os.fspath(folder), fields
        self.num_layers, self.num_experts, self.source = num_layers, num_experts, source
        self.offsets, offset = {}, 0
        for f in fields:
            self.offsets[f.name] = offset
            offset += f.nbytes
        self.record_bytes = -(-offset // ALIGN) * ALIGN
        self._fds: dict[int, int] = {}

    def path(self, layer: int) -> str:
        return os.path.join(self.folder, f"layer_{layer}.bin")

    # ---- laying it out -----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {"format": 1, "fields": [asdict(f) for f in self.fields], "num_layers": self.num_layers,
                "num_experts": self.num_experts, "record_bytes": self.record_bytes, "source": self.source}

    def matches(self) -> bool:
        """Whether the folder holds this store already, complete (its manifest is written last)."""
        try:
            with open(os.path.join(self.folder, MANIFEST)) as f:
                found = json.load(f)
        except (OSError, ValueError):
            return False
        expected = json.loads(json.dumps(self.manifest()))  # tuples as lists, as read back
        return found == expected and all(os.path.exists(self.path(layer)) for layer in range(self.num_layers))

    def begin(self) -> None:
        """Start laying the store out anew: the old manifest goes first, so that a store cut short is never used."""
        os.makedirs(self.folder, exist_ok=True)
        try:
            os.remove(os.path.join(self.folder, MANIFEST))
        except FileNotFoundError:
            pass
        for layer in range(self.num_layers):
            with open(self.path(layer), "wb") as f:
                f.truncate(self.record_bytes * self.num_experts)

    def write_field(self, layer: int, name: str, stacked: torch.Tensor) -> None:
        """Every expert's tensor `name` (stacked: (E, ...)) into its records."""
        field = next(f for f in self.fields if f.name == name)
        if tuple(stacked.shape) != (self.num_experts, *field.shape):
            raise ValueError(f"{name}: expected {(self.num_experts, *field.shape)}, got {tuple(stacked.shape)}")
        stacked = stacked.detach().to("cpu").contiguous()
        fd = os.open(self.path(layer), os.O_WRONLY)
        try:
            for e in range(self.num_experts):
                os.pwrite(fd, _bytes(stacked[e]), e * self.record_bytes + self.offsets[name])
            os.fdatasync(fd)  # written back, then let go of: the page cache keeps no copy
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def finish(self) -> None:
        with open(os.path.join(self.folder, MANIFEST), "w") as f:
            json.dump(self.manifest(), f, indent=1)

    # ---- reading -----------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Open every layer's file, checking its size: a truncated or missing file is an error, never a wrong answer."""
        for layer in range(self.num_layers):
            path, want = self.path(layer), self.record_bytes * self.num_experts
            try:
                size = os.path.getsize(path)
            except OSError as e:
                raise CheckpointError(f"the offloaded experts of layer {layer} are unreadable ({e}); delete "
                                      f"{self.folder} to lay them out again") from None
            if size != want:
                raise CheckpointError(f"{path} holds {size} bytes, not the {want} of {self.num_experts} experts: "
                                      f"truncated or from another model; delete {self.folder} to lay it out again")
            self._fds[layer] = os.open(path, os.O_RDONLY)

    def pieces(self, into: list[torch.Tensor]) -> list[tuple[int, list[Any]]]:
        """An expert's record as reads of at most PIECE bytes each, given the slot's tensors `into` (one contiguous
        tensor per field, in order): (offset in the record, the slot's buffers the read fills in turn). The fields
        lie back to back in the record, so a read may span several."""
        out: list[tuple[int, list[Any]]] = []
        filled = PIECE  # bytes in the last read: a new read starts at once
        for f, t in zip(self.fields, into):
            view, start = _bytes(t), 0
            while start < f.nbytes:
                if filled == PIECE:
                    out.append((self.offsets[f.name] + start, []))
                    filled = 0
                n = min(PIECE - filled, f.nbytes - start)
                out[-1][1].append(view[start:start + n])
                filled, start = filled + n, start + n
        return out

    def read_expert(self, layer: int, expert: int, into: list[torch.Tensor]) -> int:
        """Expert `expert`'s record in `layer` into the slot's tensors `into` (one per field, in order), piece by
        piece from the front; returns the bytes read."""
        return sum(self.read(layer, expert, offset, bufs) for offset, bufs in self.pieces(into))

    def read(self, layer: int, expert: int, offset: int, into: list[Any]) -> int:
        """Bytes from `offset` of expert `expert`'s record in `layer` into the buffers `into` in turn, in one read
        (the page cache released after it); returns the bytes read."""
        fd, start, want = self._fds[layer], expert * self.record_bytes + offset, sum(len(b) for b in into)
        got = os.preadv(fd, into, start)
        os.posix_fadvise(fd, start, want, os.POSIX_FADV_DONTNEED)
        if got != want:
            raise CheckpointError(f"{self.path(layer)}: read {got} of {want} bytes of expert {expert} at "
                                  f"{offset} (truncated?)")
        return got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
