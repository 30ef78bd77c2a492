"""Weight-only quantized replacements for Linear and Experts: int8 per output row or column group, int4 per column
group.

The weights live as buffers (qweight/scale, or packed/scales/zeros); activations stay in the model's dtype.
Few rows (decoding) run the kernels straight on the quantized weights; more rows dequantize then multiply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import hugepages, kernels
from ..model.moe import Experts

SCHEMES = ("int8", "int4")
PARTS = {"int8": ("qweight", "scale"), "int4": ("packed", "scales", "zeros")}  # the buffers of each scheme


def _quantize(w: torch.Tensor, scheme: str, group_size: int | None, symmetric: bool = False) -> dict[str, torch.Tensor]:
    """int8: per output row where group_size is None, else per group (fp16 scales); int4: per group."""
    if scheme == "int8":
        parts = kernels.quantize_int8(w, group_size)
    else:
        parts = kernels.quantize_int4(w, group_size, symmetric)
    return {name: hugepages.moved(t) for name, t in zip(PARTS[scheme], parts)}  # per part: 2x its bytes for a moment


def _empty(shape: tuple[int, ...], scheme: str, group_size: int | None, symmetric: bool = False,
           device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Buffers of the right shapes, unfilled (for loading a quantized checkpoint); symmetric int4 has empty zeros."""
    *lead, n, k = shape
    if scheme == "int8":
        scale = ((*lead, n), torch.float32) if group_size is None else ((*lead, n, k // group_size), torch.float16)
        parts = {"qweight": ((*lead, n, k), torch.int8), "scale": scale}
    else:
        g = k // group_size
        parts = {"packed": ((*lead, n, k // 2), torch.uint8), "scales": ((*lead, n, g), torch.float16),
                 "zeros": ((*lead, n, 0 if symmetric else g), torch.float16)}
    return {name: hugepages.empty(s, dtype, device) for name, (s, dtype) in parts.items()}


class _DequantizedLinear(torch.autograd.Function):
    """x @ W.T in fp32 math with W dequantized for the product, in forward and again in backward: autograd keeps
    the quantized buffers rather than a float copy of W (QLoRA: the base is frozen, only x needs a gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scheme: str, *parts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.scheme = scheme
        ctx.save_for_backward(*parts)
        return F.linear(x.float(), _dequantize(scheme, dict(zip(PARTS[scheme], parts)), torch.float32)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        parts = ctx.saved_tensors  # unpacked once: gradient checkpointing allows no second unpack
        w = _dequantize(ctx.scheme, dict(zip(PARTS[ctx.scheme], parts)), torch.float32)
        return ((grad_y.float() @ w).to(grad_y.dtype), None, *([None] * len(parts)))


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _dequantized_linear(scheme: str, x: torch.Tensor, q: dict[str, torch.Tensor]) -> torch.Tensor:
    return _DequantizedLinear.apply(x, scheme, *(q[name] for name in PARTS[scheme]))


def _linear(scheme: str, x: torch.Tensor, q: dict[str, torch.Tensor]) -> torch.Tensor:
    if _needs_grad(x):
        return _dequantized_linear(scheme, x, q)
    if scheme == "int8":
        return kernels.linear_int8(x, q["qweight"], q["scale"])
    return kernels.linear_int4(x, q["packed"], q["scales"], q["zeros"])


def _routed(scheme: str, x: torch.Tensor, q: dict[str, torch.Tensor], experts: torch.Tensor) -> torch.Tensor:
    if scheme == "int8":
        return kernels.expert_linear_int8(x, q["qweight"], q["scale"], experts)
    return kernels.expert_linear_int4(x, q["packed"], q["scales"], q["zeros"], experts)


def _dequantize(scheme: str, q: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if scheme == "int8":
        return kernels.dequantize_int8(q["qweight"], q["scale"], dtype)
    return kernels.dequantize_int4(q["packed"], q["scales"], q["zeros"], dtype)


class _KeepsBufferDtypes(nn.Module):
    """model.to(dtype) moves the quantized buffers but leaves their dtypes (fp16 scales, fp32 per-row scales, int
    codes) as they are: the kernels take only those, and a round trip through bf16 would lose bits. Only the
    dtype_of_output marker follows the dtype."""

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        before = {name: b for name, b in self._buffers.items() if b is not None and name != "dtype_of_output"}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _scheme_repr(self) -> str:
        return (f"scheme={self.scheme}" + (f", group_size={self.group_size}" if self.group_size else "")
                + (", symmetric" if self.symmetric else ""))


class QuantizedLinear(_KeepsBufferDtypes):
    """y = x @ dequantize(W).T (+ bias), W stored quantized."""

    def __init__(self, linear: nn.Linear, scheme: str, group_size: int | None, symmetric: bool = False) -> None:
        super().__init__()
        self.scheme, self.group_size, self.symmetric = scheme, group_size, symmetric
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight
        q = (_empty(tuple(w.shape), scheme, group_size, symmetric, w.device) if w.is_meta
             else _quantize(w.detach(), scheme, group_size, symmetric))
        for name, t in q.items():
            self.register_buffer(name, t)
        self.bias = linear.bias

    def quantized(self) -> dict[str, torch.Tensor]:
        return {name: self._buffers[name] for name in PARTS[self.scheme]}  # direct lookups: this runs every call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _linear(self.scheme, x, self.quantized())
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._scheme_repr()}"


class QuantizedEmbedding(_KeepsBufferDtypes):
    """nn.Embedding with its table stored quantized (a GGUF's Q4_0 or Q8_0 token_embd, as stored): the rows looked up
    are dequantized, into the model's float dtype (which a 0-element buffer follows through model.to())."""

    def __init__(self, embedding: nn.Embedding, scheme: str, group_size: int | None, symmetric: bool = False) -> None:
        super().__init__()
        self.scheme, self.group_size, self.symmetric = scheme, group_size, symmetric
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        w = embedding.weight
        q = (_empty(tuple(w.shape), scheme, group_size, symmetric, w.device) if w.is_meta
             else _quantize(w.detach(), scheme, group_size, symmetric))
        for name, t in q.items():
            self.register_buffer(name, t)
        self.register_buffer("dtype_of_output", torch.empty(0, dtype=w.dtype, device=w.device), persistent=False)

    def reset_buffers(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """After meta-device loading: the output's dtype (the model's, `dtype`) on `device`."""
        self.dtype_of_output = torch.empty(0, dtype=dtype or self.dtype_of_output.dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = {name: self._buffers[name][ids.reshape(-1)] for name in PARTS[self.scheme]}  # (T, ...) each
        return _dequantize(self.scheme, rows, self.dtype_of_output.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._scheme_repr()}"


class QuantizedExperts(_KeepsBufferDtypes, Experts):
    """Experts with gate_up_proj and down_proj quantized; routing and dispatch are Experts' own."""

    def __init__(self, experts: Experts, scheme: str, group_size: int | None, symmetric: bool = False) -> None:
        nn.Module.__init__(self)
        self.num_experts, self.act = experts.num_experts, experts.act
        self.scheme, self.group_size, self.symmetric = scheme, group_size, symmetric
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name)
            q = (_empty(tuple(w.shape), scheme, group_size, symmetric, w.device) if w.is_meta
                 else _quantize(w.detach(), scheme, group_size, symmetric))
            for part, t in q.items():
                self.register_buffer(f"{name}_{part}", t)  # e.g. gate_up_proj_qweight (E, 2I, H)

    def _parts(self, name: str) -> dict[str, torch.Tensor]:
        return {part: self._buffers[f"{name}_{part}"] for part in PARTS[self.scheme]}

    def routed_linear(self, name: str, x_TK: torch.Tensor, experts_TJ: torch.Tensor) -> torch.Tensor:
        return _routed(self.scheme, x_TK, self._parts(name), experts_TJ)

    def expert_weight(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        return _dequantize(self.scheme, {k: v[e] for k, v in self._parts(name).items()}, dtype)

    def expert_linear(self, name: str, e: int, x_MK: torch.Tensor) -> torch.Tensor:
        if _needs_grad(x_MK):  # QLoRA: no float copy of the expert kept for backward
            return _dequantized_linear(self.scheme, x_MK, {k: v[e] for k, v in self._parts(name).items()})
        return super().expert_linear(name, e, x_MK)

    def grouped_mlp(self, x_NH: torch.Tensor, counts: list[int], weights_N: torch.Tensor) -> torch.Tensor:
        return self.expert_loop(x_NH, counts, weights_N)  # one expert at a time, each dequantized for its tokens
