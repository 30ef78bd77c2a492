"""CPU weights in transparent huge pages (2 MiB): decoding reads every weight once a token, and with 4 KiB pages each
4 KiB costs a TLB miss and restarts the hardware prefetchers (Mixtral-8x7B's 25 GB are 6 million pages). On the
bench model in int4 it measured +7% in an in-process A/B and -8% to +2% in three benchmark runs: not settled
(BENCHMARKS.md). torch's allocator advises huge pages only when
THP_MEM_ALLOC_ENABLE=1 is set before torch starts, for every allocation; Linux's default THP mode ("madvise") gives
them only where asked. So the loaders take their large weights from here: each tensor its own private anonymous
mapping, 2 MiB-aligned, with MADV_HUGEPAGE on its whole 2 MiB pages (the tail stays in 4 KiB pages, so no huge page
is only partly used). Freed with the tensor (the mapping closes when its storage goes). Elsewhere (not Linux, not
CPU, small tensors, THP off, or MIXTRAL_HUGEPAGES=0) a plain torch.empty.
"""

from __future__ import annotations

import functools
import math
import mmap
import os

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # smaller tensors would hold no whole huge page


def enabled() -> bool:
    """Whether empty() hands out huge-page memory: Linux with THP not "never", not turned off by MIXTRAL_HUGEPAGES=0."""
    return os.environ.get("MIXTRAL_HUGEPAGES", "1") != "0" and _thp_available()


@functools.cache
def _thp_available() -> bool:
    """The kernel takes MADV_HUGEPAGE (read once: the loaders ask for every large tensor)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _eligible(nbytes: int, device: torch.device | str | None) -> bool:
    return torch.device(device or "cpu").type == "cpu" and nbytes >= MIN_BYTES and enabled()


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str | None = None
          ) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), in huge pages where it is a CPU tensor of >= 2 MiB."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not _eligible(nbytes, device):
        return torch.empty(shape, dtype=dtype, device=device)
    # MAP_PRIVATE: Python's default for fd -1 is a shared mapping, whose huge pages follow shmem's setting instead
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    start = -base % HUGE_PAGE  # untouched below start: no memory
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, start, whole)
    # the tensor's storage is exactly its bytes (torch.save writes no slack) and holds the mapping open
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=start).view(dtype).view(shape)


def moved(t: torch.Tensor) -> torch.Tensor:
    """t in huge pages: a contiguous copy where empty() gives huge pages for its size, else t itself."""
    if not _eligible(t.numel() * t.element_size(), t.device):
        return t
    return empty(t.shape, t.dtype, t.device).copy_(t)
