"""The sparse MoE block: a top-k router, a token dispatcher, and experts stored stacked.

Shape legend: T tokens (batch * sequence), H hidden, I expert intermediate, E experts, K experts per token.
Parameter names are Transformers 5's (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MixtralConfig
from ..kernels import expert_linear, expert_mlp, linear

# Up to this many tokens (decode, batches, short prompts) the experts run in the kernels on the routed experts'
# weights, each read once for its tokens; above it, tokens are sorted by expert and each expert runs one GEMM.
FEW_TOKENS = 64

ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@functools.cache
def _cutlass_grouped_mm(device: torch.device) -> bool:
    """Whether torch's grouped GEMM has its CUTLASS kernel on this GPU (Hopper, Blackwell): elsewhere, and for
    dtypes other than bf16, it loops over the groups and reads their sizes back to the host."""
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] in (9, 10)


def grouped_mm_fits(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether x (N, K) times stacked (E, N', K) weights runs as grouped GEMMs with no host sync: bf16 on a GPU that
    has the kernel, every row 16-byte aligned. A None weight (quantized experts keep theirs as buffers) never does."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and _cutlass_grouped_mm(x.device)
            and all(w is not None and w.dtype == x.dtype and w.device == x.device and w.shape[1] % 8 == 0
                    and w.shape[2] % 8 == 0 for w in weights))


class Router(nn.Module):
    """Linear gate -> softmax in fp32 -> top-k -> weights renormalised to sum to 1."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))  # (E, H)

    def logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        return linear(x_TH, self.weight)  # (T, E): the decode kernel for few tokens, else F.linear

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = self.logits(x_TH)
        probs_TE = F.softmax(logits_TE.float(), dim=-1)
        weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return logits_TE, weights_TK, experts_TK


class Experts(nn.Module):
    """E SiLU-gated MLPs, w1 and w3 fused: gate_up_proj (E, 2I, H) = [w1; w3], down_proj (E, H, I) = w2."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act = ACTIVATIONS[config.hidden_act]

    # The ways to apply expert weights; a quantized subclass overrides these, LoRA adds to the first and last.
    def routed_linear(self, name: str, x_TK: torch.Tensor, experts_TJ: torch.Tensor) -> torch.Tensor:
        """(T, K) x routed experts (T, J) of weight `name` -> (T, J, N), reading only the routed experts."""
        return expert_linear(x_TK, getattr(self, name), experts_TJ)

    def expert_weight(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's (N, K) weight `name`."""
        unbound = self.__dict__.get("_unbound")
        return unbound[name][e] if unbound and name in unbound else getattr(self, name)[e]

    def expert_linear(self, name: str, e: int, x_MK: torch.Tensor) -> torch.Tensor:
        """x_MK (M, K) times expert e's weight `name` -> (M, N)."""
        return F.linear(x_MK, self.expert_weight(name, e, x_MK.dtype))

    def grouped_mlp(self, x_NH: torch.Tensor, counts: list[int], weights_N: torch.Tensor) -> torch.Tensor:
        """Each expert's MLP over its contiguous rows of x_NH (sorted by expert, counts[e] rows each), each row times
        its routing weight weights_N (fp32 product, as Transformers), in x's dtype."""
        if self.act is F.silu:  # the kernel runs whole experts on each thread (torch splits each GEMM instead)
            y_NH = expert_mlp(x_NH, self.gate_up_proj, self.down_proj, counts, weights_N)
            if y_NH is not None:
                return y_NH
        return self.expert_loop(x_NH, counts, weights_N)

    def expert_loop(self, x_NH: torch.Tensor, counts: list[int], weights_N: torch.Tensor) -> torch.Tensor:
        """grouped_mlp with torch ops, one expert at a time. Weights that train are unbound once for the loop: taking
        each expert's slice by indexing makes backward zero-fill a whole (E, N, K) gradient per expert and add them
        up (30% of a full fine-tuning step, measured); unbind's backward stacks the E gradients once."""
        self._unbound = {name: p.unbind(0) for name, p in self.named_parameters(recurse=False)
                         if p.requires_grad and torch.is_grad_enabled()}
        outs, start = [], 0
        try:
            for e, n in enumerate(counts):
                if n:
                    outs.append(self.expert_mlp(e, x_NH[start:start + n]))
                    start += n
        finally:
            self._unbound = {}
        return (torch.cat(outs) * weights_N[:, None]).to(x_NH.dtype)  # fp32 product, as Transformers

    def expert_mlp(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        gate_TI, up_TI = self.expert_linear("gate_up_proj", e, x_TH).chunk(2, dim=-1)
        return self.expert_linear("down_proj", e, self.act(gate_TI) * up_TI)

    def forward(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        return self.pair_outputs(x_TH, weights_TK, experts_TK).sum(dim=1)

    def pair_outputs(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                     few: bool | None = None) -> torch.Tensor:
        """(T, K, H): each (token, routed expert) pair's output times its routing weight, in x's dtype; forward sums
        them over K. few: the decode path (True) or the sorted one (False); None: as T decides. Each pair's output
        is computed on its own, so that a subset of the pairs (mixtral.offload, expert by expert) gives the same."""
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not trainable and self.runs_grouped(x_TH):
            return self.forward_sorted(x_TH, weights_TK, experts_TK, on_device=True)
        if few is None:
            few = not trainable and x_TH.shape[0] <= FEW_TOKENS
        if few:
            return self.forward_few(x_TH, weights_TK, experts_TK)
        return self.forward_sorted(x_TH, weights_TK, experts_TK)

    def forward_few(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """Decode: matrix-vector products with the routed experts' weights only; no host sync, compiles whole."""
        t, k = experts_TK.shape
        gate_TKI, up_TKI = self.routed_linear("gate_up_proj", x_TH, experts_TK).chunk(2, dim=-1)
        h_NI = (self.act(gate_TKI) * up_TKI).reshape(t * k, -1)  # N = T*K, one expert each
        y_TKH = self.routed_linear("down_proj", h_NI, experts_TK.reshape(-1, 1)).view(t, k, -1)
        return (y_TKH * weights_TK[..., None]).to(x_TH.dtype)  # fp32 product, as in forward_sorted

    def forward_sorted(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                       on_device: bool = False) -> torch.Tensor:
        """Sort the T*K (token, expert) pairs by expert once; run each routed expert over its contiguous slice, with
        the group sizes read back to the host (one sync per layer), or on_device as grouped GEMMs (grouped_gemm_mlp:
        no sync, so that a CUDA graph can hold the step). Returns the pairs' outputs (T, K, H)."""
        t, k = experts_TK.shape
        sorted_N, order_N = torch.sort(experts_TK.reshape(-1), stable=True)  # N = T*K assignments
        x_NH = x_TH[order_N // k]  # each token repeated once per expert it was routed to, grouped by expert
        weights_N = weights_TK.reshape(-1)[order_N]
        if on_device:
            y_NH = self.grouped_gemm_mlp(x_NH, sorted_N, weights_N)
        else:
            counts = torch.bincount(sorted_N, minlength=self.num_experts).tolist()  # one host sync per layer
            y_NH = self.grouped_mlp(x_NH, counts, weights_N)
        return torch.empty_like(y_NH).index_copy_(0, order_N, y_NH).view(t, k, -1)  # back to token order

    def runs_grouped(self, x_TH: torch.Tensor) -> bool:
        """Whether inference on x goes to grouped_gemm_mlp (bf16 on a GPU with torch's grouped GEMM kernel)."""
        # is_cuda first: on CPU this runs in every eager decode step, before the weights need looking up
        return x_TH.is_cuda and grouped_mm_fits(x_TH, *map(self._parameters.get, ("gate_up_proj", "down_proj")))

    def grouped_gemm_mlp(self, x_NH: torch.Tensor, experts_N: torch.Tensor, weights_N: torch.Tensor) -> torch.Tensor:
        """grouped_mlp as two grouped GEMMs over all experts (torch._grouped_mm), expert e's rows ending where
        searchsorted finds e + 1 in the sorted expert ids experts_N: computed on the device, never read back."""
        ends_E = torch.arange(1, self.num_experts + 1, device=x_NH.device, dtype=experts_N.dtype)
        offsets_E = torch.searchsorted(experts_N, ends_E).to(torch.int32)
        gate_NI, up_NI = torch._grouped_mm(x_NH, self.gate_up_proj.transpose(1, 2), offs=offsets_E).chunk(2, dim=-1)
        y_NH = torch._grouped_mm(self.act(gate_NI) * up_NI, self.down_proj.transpose(1, 2), offs=offsets_E)
        return (y_NH * weights_N[:, None]).to(x_NH.dtype)  # fp32 product, as Transformers


class SparseMoeBlock(nn.Module):
    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.jitter_noise = config.router_jitter_noise
        self.gate = Router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, H) -> (output (B, S, H), router logits (B*S, E))."""
        b, s, h = x.shape
        if self.training and self.jitter_noise > 0:  # the jittered input feeds both router and experts
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x_TH = x.reshape(-1, h)
        logits_TE, weights_TK, experts_TK = self.gate(x_TH)
        return self.experts(x_TH, weights_TK, experts_TK).view(b, s, h), logits_TE
