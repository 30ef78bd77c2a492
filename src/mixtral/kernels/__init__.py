"""Matrix-vector kernels for decoding on CPU: x @ w.T for a few rows of x, with fp32, bf16, int8 or int4 weights.

Decoding a token multiplies one row per token by every weight it uses, once: the speed limit is memory bandwidth,
which torch's own paths for a single row reach only partly (bf16 and int8 far from it). The compiled kernels
(matvec.cpp, built on first use by cpu.py) stream each weight row once for all rows of x, widen it to fp32 in
registers (or, with bf16 x, multiply bf16 pairs by VDPBF16PS: bf16 and int4 weights) and accumulate in fp32. Every
function here falls back to torch ops, with the same results within dtype rounding, when the kernels are
unavailable (no compiler or no AVX512: see `available()`) or the inputs are not theirs: not on CPU, needing grad,
or more than MAX_ROWS rows of x (long prompts, where F.linear is the faster path).

Shape suffixes: M rows of x, K inputs, N outputs, E experts, T tokens, J (Kt) experts per token, G groups per row.

Quantized layouts (weight-only; x stays fp32 or bf16):
- int8, symmetric per output row: w[n, k] ~ qweight[n, k] * scale[n], qweight in [-127, 127], scale fp32; or per
  group of `group_size` columns (a multiple of 32) as llama.cpp's Q8_0 (blocks of 32): w[n, k] ~ qweight[n, k] *
  scale[n, k // group_size], scale fp16 (..., N, G): 8.5 bits a weight in groups of 32.
- int4, asymmetric per group of `group_size` consecutive columns: w[n, k] ~ q[n, k] * scales[n, g] + zeros[n, g]
  with g = k // group_size and q in [0, 15]; `zeros` is the value of code 0 (the group's minimum), so the error is
  at most scales / 2. Two codes a byte, in column order: packed[n, i] = q[n, 2i] | q[n, 2i + 1] << 4. Scales and
  zeros are fp16, as llama.cpp's block scales (the product is fp32): 4.25 bits a weight in groups of 128, 5 in 32.
  Symmetric int4 (llama.cpp's Q4_0) has no zeros (an empty (..., N, 0) tensor): w = (q - 8) * scales, 4.5 bits
  a weight in groups of 32.
  The kernels take group sizes of 32, 64 and multiples of 128; others run the torch fallback.

Opt-in int8 activations (MIXTRAL_INT8_ACTIVATIONS=1, x86): symmetric int4 and int8 in groups of 32 (llama.cpp's
Q4_0 and Q8_0) multiply x rounded to int8 per block of 32 columns (an fp32 scale each, as llama.cpp's Q8_0
activations) by integer dot products (matvec_q8.cpp): about half the work of the float kernels, which matters where
they are compute-bound (AVX2), at the cost of x's rounding (up to 1/254 of each block's largest value).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import cpu

INT8_ACTIVATIONS = os.environ.get("MIXTRAL_INT8_ACTIVATIONS") == "1"  # see the module doc
MAX_ROWS = 64  # rows of x up to which the kernels beat F.linear here (benchmarks/matvec.py); above, oneDNN's GEMMs
FLOATS = (torch.float32, torch.bfloat16)

__all__ = ["available", "has_bf16_dot", "has_int8_dot", "linear", "expert_linear", "quantize_int8", "dequantize_int8",
           "linear_int8", "expert_linear_int8", "quantize_int4", "dequantize_int4", "linear_int4", "expert_linear_int4",
           "attention", "expert_mlp"]


@torch.compiler.assume_constant_result  # torch.compile bakes the answer in rather than tracing the build
def available() -> bool:
    """Whether the compiled kernels are in use here (builds them on first call); else every function runs torch."""
    return cpu.extension() is not None


@torch.compiler.assume_constant_result
def has_bf16_dot() -> bool:
    """Whether the kernels run bf16 products with VDPBF16PS here (AVX512_BF16): the bf16-only kernels need it."""
    return available() and torch.ops.mixtral_kernels.has_bf16_dot()


@torch.compiler.assume_constant_result
def has_int8_dot() -> bool:
    """Whether the opt-in int8-activation kernels (linear_q8) run here: x86 with the compiled kernels."""
    return available() and torch.ops.mixtral_kernels.has_int8_dot()


def _int8_activations(scales: torch.Tensor, k: int, zeros: torch.Tensor | None = None) -> bool:
    """MIXTRAL_INT8_ACTIVATIONS is on and the weights are a llama.cpp block format: groups of 32 (int4: symmetric)."""
    return (INT8_ACTIVATIONS and scales.dtype == torch.float16 and scales.shape[-1] * 32 == k
            and (zeros is None or zeros.shape[-1] == 0) and has_int8_dot())


def _inference_on_cpu(*tensors: torch.Tensor) -> bool:
    """All on CPU, with no gradient to record through them: what every compiled op needs (they have no backward)."""
    return all(t.is_cpu for t in tensors) and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _kernels(x: torch.Tensor, *weights: torch.Tensor, experts: torch.Tensor | None = None) -> Any | None:
    """The compiled ops if they take these inputs (CPU, no grad, few rows, contiguous weights), else None.

    Few rows: at most MAX_ROWS rows of x, or with routed experts (E, N, K) at most MAX_ROWS rows per expert on
    average (x rows * experts per row <= MAX_ROWS * E): each routed expert's weights are read once for its rows."""
    # Attribute checks only: this runs on every call, where a torch op costs microseconds.
    rows = MAX_ROWS if experts is None else MAX_ROWS * weights[0].shape[0] // max(1, experts.shape[-1])
    if x.dtype not in FLOATS or not 0 < x.numel() <= rows * x.shape[-1]:
        return None
    if experts is not None:
        weights = (*weights, experts)
    if not all(w.is_contiguous() for w in weights) or not _inference_on_cpu(x, *weights):
        return None
    return torch.ops.mixtral_kernels if available() else None


def _per_expert(x_TK: torch.Tensor, experts_TJ: torch.Tensor, num_experts: int, n: int,
                linear_e: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Torch path of the expert_* functions: one linear_e(x rows, e) per routed expert, over its tokens.

    Compiled, every expert runs over every token and `where` keeps the routed ones (E/Kt times the reads): the loop
    over the routed experts reads their ids back to the host, which a compiled step that skips guards
    (decode.compiled_forward_last) would bake in, replaying the experts of the step it was traced on."""
    if torch.compiler.is_compiling():
        out_TJN = x_TK.new_zeros(*experts_TJ.shape, n)
        for e in range(num_experts):
            out_TJN = torch.where((experts_TJ == e)[..., None], linear_e(x_TK, e)[:, None], out_TJN)
        return out_TJN
    out_TJN = x_TK.new_empty(*experts_TJ.shape, n)
    for e in experts_TJ.unique().tolist():  # a host sync; the kernels have none
        t, j = (experts_TJ == e).nonzero(as_tuple=True)
        out_TJN[t, j] = linear_e(x_TK[t], e)
    return out_TJN


def _float_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T in fp32 math, returned in x's dtype: the torch reference for the quantized kernels."""
    return F.linear(x.float(), w.float()).to(x.dtype)


# ---- fp32 / bf16 weights ---------------------------------------------------------------------------------------
def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T, (..., K) x (N, K) -> (..., N): the kernel for up to MAX_ROWS rows with w fp32 or bf16 (x alike)."""
    ops = _kernels(x, w)
    if ops is None or w.dim() != 2 or x.dtype != w.dtype:
        return F.linear(x, w)
    return ops.linear(x, w, None, True)


def expert_linear(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """(T, K) x (E, N, K) routed by experts (T, Kt) -> (T, Kt, N): out[t, j] = w[experts[t, j]] @ x[t]."""
    ops = _kernels(x, w, experts=experts)
    if ops is None or x.dtype != w.dtype or experts.dtype != torch.long:
        return _per_expert(x, experts, w.shape[0], w.shape[1], lambda x_MK, e: F.linear(x_MK, w[e]))
    return ops.linear(x, w, experts, True)


# ---- int8 weights ----------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N, K) float -> (qweight int8 (..., N, K), scale), symmetric: per output row (scale float32 (..., N)),
    or per group of group_size columns (scale float16 (..., N, K / group_size), the codes chosen against it)."""
    w = w.float()
    if group_size is None:
        scale = w.abs().amax(dim=-1) / 127  # (..., N)
        qweight = (w / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).round().clamp(-127, 127)
        return qweight.to(torch.int8), scale
    k = w.shape[-1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"int8 groups need K divisible by group_size; got K={k}, group_size={group_size}")
    w_NGS = w.unflatten(-1, (k // group_size, group_size))
    scale = (w_NGS.abs().amax(dim=-1) / 127).half()  # (..., N, G)
    if not scale.isfinite().all():
        raise ValueError("grouped int8 stores its scales in float16: these weights exceed its range (65504)")
    safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    qweight = (w_NGS / safe).round().clamp(-127, 127).flatten(-2)
    return qweight.to(torch.int8), scale


def _by_row_blocks(shape: torch.Size, dtype: torch.dtype, device: torch.device,
                   block: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """An (..., N, K) tensor filled a block of rows at a time by block(rows) (fp32 math): the fp32 temporaries
    stay ~1 MB, where a whole expert's would be hundreds of MB that the C heap then keeps (RSS)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    step = max(1, (1 << 18) // max(1, shape[-1]))
    for r in range(0, shape[-2], step):
        rows = slice(r, r + step)
        out[..., rows, :] = block(rows)
    return out


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """qweight * scale (per row, or per group when scale is (..., N, G)): (..., N, K) weights in `dtype`."""
    if scale.dim() == qweight.dim():  # grouped
        return _by_row_blocks(qweight.shape, dtype, qweight.device, lambda rows: (
            qweight[..., rows, :].float().unflatten(-1, (scale.shape[-1], -1)) * scale[..., rows, :, None].float()
        ).flatten(-2))
    return _by_row_blocks(qweight.shape, dtype, qweight.device,
                          lambda rows: qweight[..., rows, :].float() * scale[..., rows, None])


def _int8_kernel_takes(qweight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Per-row scales, or groups of a multiple of 32 columns."""
    if scale.dim() < qweight.dim():
        return True
    k, g = qweight.shape[-1], scale.shape[-1]
    return g > 0 and k % g == 0 and (k // g) % 32 == 0


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ dequantize_int8(qweight, scale).T, (..., K) -> (..., N) in x's dtype, fp32 math."""
    ops = _kernels(x, qweight, scale)
    if ops is None or qweight.dim() != 2 or not _int8_kernel_takes(qweight, scale):
        return _float_linear(x, dequantize_int8(qweight, scale))
    if _int8_activations(scale, qweight.shape[-1]):
        return ops.linear_q8(x, qweight, scale, 8, None)
    return ops.linear_int8(x, qweight, scale, None)


def expert_linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       experts: torch.Tensor) -> torch.Tensor:
    """expert_linear with int8 experts: qweight (E, N, K), scale (E, N) or (E, N, G) -> (T, Kt, N) in x's dtype."""
    ops = _kernels(x, qweight, scale, experts=experts)
    if ops is None or experts.dtype != torch.long or not _int8_kernel_takes(qweight, scale):
        return _per_expert(x, experts, *qweight.shape[:2],
                           lambda x_MK, e: _float_linear(x_MK, dequantize_int8(qweight[e], scale[e])))
    if _int8_activations(scale, qweight.shape[-1]):
        return ops.linear_q8(x, qweight, scale, 8, experts)
    return ops.linear_int8(x, qweight, scale, experts)


# ---- int4 weights ----------------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int = 128,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., N, K) float -> (packed uint8 (..., N, K/2), scales, zeros float16 (..., N, K/group_size)): asymmetric,
    or symmetric (zeros (..., N, 0)) as llama.cpp's Q4_0: the value of largest magnitude m is code 0, scale -m/8.

    The codes are chosen against the fp16 scale and zero, so the rounding of those two costs only what it moves."""
    k = w.shape[-1]
    if k % 2 or group_size <= 0 or k % group_size:
        raise ValueError(f"int4 needs an even K divisible by group_size; got K={k}, group_size={group_size}")
    w_NGS = w.float().unflatten(-1, (k // group_size, group_size))  # S = group_size
    if symmetric:
        m = w_NGS.gather(-1, w_NGS.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # (..., N, G), signed
        scales = (m / -8).half()
        zeros = scales.new_empty(*scales.shape[:-1], 0)
        offset = -8 * scales.float()
    else:
        zeros = w_NGS.amin(dim=-1).half()  # (..., N, G)
        scales = ((w_NGS.amax(dim=-1) - zeros) / 15).half()
        offset = zeros.float()
    if not (scales.isfinite().all() and zeros.isfinite().all()):
        raise ValueError("int4 stores scales and zeros in float16: these weights exceed its range (65504)")
    safe = torch.where(scales == 0, torch.finfo(torch.float32).tiny, scales.float()).unsqueeze(-1)  # (..., N, G, 1)
    q = ((w_NGS - offset.unsqueeze(-1)) / safe).round().clamp(0, 15).to(torch.uint8).flatten(-2)  # (..., N, K)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # (..., N, K/2)
    return packed, scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scales + zeros per group: (..., N, K) weights in `dtype`."""
    def block(rows: slice) -> torch.Tensor:
        p = packed[..., rows, :]
        q = torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)  # (..., n, K), column order
        q_nGS = q.unflatten(-1, (scales.shape[-1], -1)).float()
        s = scales[..., rows, :, None].float()
        zero = -8 * s if zeros.shape[-1] == 0 else zeros[..., rows, :, None].float()  # symmetric: see module doc
        return (q_nGS * s + zero).flatten(-2)

    return _by_row_blocks((*packed.shape[:-1], packed.shape[-1] * 2), dtype, packed.device, block)


def _int4_group_size(packed: torch.Tensor, scales: torch.Tensor) -> int | None:
    """The group size if the kernels take it (32, 64 or a multiple of 128), else None."""
    k, g = packed.shape[-1] * 2, scales.shape[-1]
    return k // g if g and k % g == 0 and (k // g in (32, 64) or (k // g) % 128 == 0) else None


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x @ dequantize_int4(packed, scales, zeros).T, (..., K) -> (..., N) in x's dtype, fp32 math."""
    ops = _kernels(x, packed, scales, zeros)
    group_size = _int4_group_size(packed, scales)
    if ops is None or group_size is None or packed.dim() != 2:
        return _float_linear(x, dequantize_int4(packed, scales, zeros))
    if _int8_activations(scales, 2 * packed.shape[-1], zeros):
        return ops.linear_q8(x, packed, scales, 4, None)
    return ops.linear_int4(x, packed, scales, zeros, group_size, None)


def expert_linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       experts: torch.Tensor) -> torch.Tensor:
    """expert_linear with int4 experts: packed (E, N, K/2), scales and zeros (E, N, G) -> (T, Kt, N) in x's dtype."""
    ops = _kernels(x, packed, scales, zeros, experts=experts)
    group_size = _int4_group_size(packed, scales)
    if ops is None or group_size is None or experts.dtype != torch.long:
        return _per_expert(x, experts, *packed.shape[:2],
                           lambda x_MK, e: _float_linear(x_MK, dequantize_int4(packed[e], scales[e], zeros[e])))
    if _int8_activations(scales, 2 * packed.shape[-1], zeros):
        return ops.linear_q8(x, packed, scales, 4, experts)
    return ops.linear_int4(x, packed, scales, zeros, group_size, experts)


# ---- attention over a KV cache -----------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v, grouped-query heads shared: up to MAX_ROWS queries (decoding) in `attend`, more
    (prefill) in `prefill_attend` (head sizes that are multiples of 32; bf16 with AVX512_BF16), else sdpa.

    q (B, nh, S, D), k and v (B, nkv, T, D); mask bool (B|1, 1, S, T), True where a query may look, or None for
    causal (query s sits at slot s + T - S). Returns (B, nh, S, D). A query that sees nothing gets zeros (as sdpa's
    CPU kernel does). `attend` keeps the probabilities in fp32; `prefill_attend` rounds them to the dtype for the
    product with v, as sdpa does.
    """
    qkv = (q, k, v)
    usable = (q.dtype in FLOATS and q.dtype == k.dtype == v.dtype and all(t.stride(-1) == 1 for t in qkv)
              and (mask is None or mask.dtype == torch.bool) and _inference_on_cpu(*qkv))
    few = q.shape[2] <= MAX_ROWS
    if usable and available() and (few or (q.shape[-1] % 32 == 0 and (q.dtype == torch.float32 or has_bf16_dot()))):
        op = torch.ops.mixtral_kernels.attend if few else torch.ops.mixtral_kernels.prefill_attend
        return op(q, k, v, mask, scale, mask is None)
    causal = mask is None and q.shape[2] > 1
    if causal and k.shape[2] != q.shape[2]:  # sdpa's is_causal aligns top-left; ours bottom-right
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ---- expert MLPs over sorted tokens ------------------------------------------------------------------------------
def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int],
               weights: torch.Tensor | None = None) -> torch.Tensor | None:
    """SiLU-gated expert MLPs over x (N, H) sorted by expert, counts[e] rows each: gate_up (E, 2I, H), down (E, H, I)
    -> (N, H), one expert per thread, each row times weights (N,) float32 if given (the product in fp32). None where
    the kernels do not apply (then run the experts one by one)."""
    scaled = () if weights is None else (weights,)
    usable = (x.dtype in FLOATS and x.dtype == gate_up.dtype == down.dtype
              and _inference_on_cpu(x, gate_up, down, *scaled)
              and all(w.dtype == torch.float32 and w.is_contiguous() for w in scaled))
    return torch.ops.mixtral_kernels.expert_mlp(x, gate_up, down, counts, weights) if usable and available() else None
