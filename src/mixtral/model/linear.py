"""nn.Linear whose few-row calls (decoding) go to the bandwidth-bound matrix-vector kernels."""

import torch
from torch import nn

from ..kernels import linear


class Linear(nn.Linear):
    """A drop-in nn.Linear (same parameters and state dict); kernels.linear picks the kernel or F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        return out if self.bias is None else out + self.bias
