"""Where a parameter's elements come from when it is a slice of the full one (a tensor- or expert-parallel rank's
share): boxes, one (start, stop) range per dim, and the pieces that map a box of the slice onto a box of the full
parameter. Loading reads only those boxes of each checkpoint tensor (safetensors' get_slice), so that a rank never
holds more than its share.

Shapes: a Box has one slice per dim of its tensor, each with concrete start and stop (step 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Box = tuple[slice, ...]


def full_box(shape: tuple[int, ...] | torch.Size) -> Box:
    return tuple(slice(0, n) for n in shape)


def box_of(index: tuple, shape: tuple[int, ...] | torch.Size) -> tuple[Box, tuple[int, ...]]:
    """A parameter index made of ints and slices (a recipe Part's) as a Box over `shape`, and the dims the ints
    select (absent from the tensor that fills the index)."""
    box, dropped = [], []
    for dim, n in enumerate(shape):
        i = index[dim] if dim < len(index) else slice(None)
        if isinstance(i, int):
            box.append(slice(i, i + 1))
            dropped.append(dim)
        else:
            start, stop, step = i.indices(n)
            if step != 1:
                raise ValueError(f"a strided index {i} cannot be sliced")
            box.append(slice(start, stop))
    return tuple(box), tuple(dropped)


def intersect(a: Box, b: Box) -> Box | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.start >= s.stop for s in out) else out


def shift(box: Box, old_origin: Box, new_origin: Box) -> Box:
    """`box`, given relative to old_origin's starts, relative to new_origin's starts."""
    return tuple(slice(s.start - o.start + n.start, s.stop - o.start + n.start)
                 for s, o, n in zip(box, old_origin, new_origin))


@dataclass
class Sharding:
    """A parameter that is part of a bigger one: `full` is the full parameter's shape; each piece (dst, src) says
    that box dst of the parameter holds box src of the full one."""

    full: tuple[int, ...]
    pieces: list[tuple[Box, Box]]

    @classmethod
    def whole(cls, shape: tuple[int, ...] | torch.Size) -> "Sharding":
        return cls(tuple(shape), [(full_box(shape), full_box(shape))])

    def take(self, boxes: list[Box], dim: int) -> "Sharding":
        """The sharding of the tensor made by concatenating these boxes of this one along `dim`."""
        pieces, offset = [], 0
        for box in boxes:
            at = tuple(slice(offset, offset + s.stop - s.start) if d == dim else slice(0, s.stop - s.start)
                       for d, s in enumerate(box))  # where the box lands in the new tensor
            for dst, src in self.pieces:
                common = intersect(box, dst)
                if common is not None:
                    pieces.append((shift(common, box, at), shift(common, dst, src)))
            offset += box[dim].stop - box[dim].start
        return Sharding(self.full, pieces)
