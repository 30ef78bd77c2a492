"""Expert parallelism applied to a loaded model: each of N ranks keeps E/N experts of every layer. Every rank holds
the same hidden states (as in plain or tensor-parallel inference) and computes the routing once; each rank then
dispatches its own share of the tokens: the (token, expert) pairs go to the rank that owns the expert with
all_to_all_single (the split sizes exchanged first), come back computed, are combined in token order, and an
all_gather gives every rank every token's output.

On a tensor-parallel model (a 2-D mesh: `group` holds the ranks with the same tensor-parallel rank), each rank's
experts are already split on I: the results are partial sums, which the all-reduce over the tensor-parallel group
completes. Inference only. Shapes: N ranks, T tokens (T_r this rank's share), K experts a token, P pairs, H hidden.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import comm
from .tensor import all_reduce_first, keep_slice, require_distributed


def check_expert_parallel(config: Any, world: int) -> None:
    e = config.num_local_experts
    if world < 1 or e % world:
        raise ValueError(f"expert parallel over {world} ranks needs num_local_experts ({e}) divisible by {world}")


def _share(t: int, world: int, rank: int) -> tuple[int, int, int]:
    """(lo, hi, size): `rank` dispatches tokens [lo, hi) of T; shares are size = ceil(T/N), the last ranks' possibly
    shorter or empty."""
    size = -(-t // world)
    return min(t, rank * size), min(t, (rank + 1) * size), size


class ExpertParallelMoe(nn.Module):
    """A SparseMoeBlock whose experts are spread over the ranks of `group`; same inputs and outputs."""

    def __init__(self, block: nn.Module, group: Any) -> None:
        super().__init__()
        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.gate, self.experts = block.gate, block.experts
        self.per_rank = self.experts.num_experts // self.world
        first = self.rank * self.per_rank
        keep_slice(self.experts, "gate_up_proj", (slice(first, first + self.per_rank),))
        keep_slice(self.experts, "down_proj", (slice(first, first + self.per_rank),))
        self.experts.num_experts = self.per_rank
        self.idle_steps = 0  # forwards in which no pair came to this rank's experts
        self.train(block.training)

    def _exchange(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        recv = send.new_empty(sum(recv_splits), *send.shape[1:])
        comm.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group)
        return recv

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, H) -> (output (B, S, H), router logits (B*S, E))."""
        if self.training:
            raise RuntimeError("expert_parallel is for inference: call model.eval()")
        b, s, h = x.shape
        x_TH = x.reshape(-1, h)
        logits_TE, weights_TK, experts_TK = self.gate(x_TH)  # the same on every rank
        t, k = experts_TK.shape
        lo, hi, size = _share(t, self.world, self.rank)
        experts_P = experts_TK[lo:hi].reshape(-1)  # P = T_r * K pairs, (token, k) order
        owner_P = experts_P // self.per_rank
        order_P = torch.argsort(owner_P, stable=True)  # pairs grouped by the rank that owns their expert
        send_counts = torch.bincount(owner_P, minlength=self.world)  # (N,)
        recv_counts = torch.empty_like(send_counts)
        comm.all_to_all_single(recv_counts, send_counts, group=self.group)  # split sizes first
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()  # one host sync a layer

        x_in = self._exchange(x_TH[lo:hi][order_P // k], send_splits, recv_splits)  # (P_in, H)
        local_in = self._exchange(experts_P[order_P] % self.per_rank, send_splits, recv_splits)  # (P_in,)
        weights_in = self._exchange(weights_TK[lo:hi].reshape(-1)[order_P], send_splits, recv_splits)
        if x_in.shape[0]:  # each pair alone (K = 1), times its routing weight in fp32, as SparseMoeBlock does
            y_in = self.experts(x_in, weights_in[:, None], local_in[:, None])
        else:
            y_in, self.idle_steps = x_in, self.idle_steps + 1
        y_P = self._exchange(y_in, recv_splits, send_splits)  # back to the ranks that sent them
        y_TH = torch.empty_like(y_P).index_copy_(0, order_P, y_P).view(hi - lo, k, h).sum(dim=1)  # (T_r, H)

        # all_gather wants equal shares: pad to size
        mine = torch.cat([y_TH, y_TH.new_zeros(size - (hi - lo), h)])
        shares = [torch.empty_like(mine) for _ in range(self.world)]
        comm.all_gather(shares, mine, group=self.group)
        return torch.cat(shares)[:t].view(b, s, h), logits_TE


def expert_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Spread the experts of `model` (MixtralModel or a model with one) in place over the ranks of `group`
    (default: the whole world). Every rank calls it and then runs the same calls with the same inputs."""
    require_distributed("expert_parallel")
    world = dist.get_world_size(group)
    check_expert_parallel(model.config, world)
    backbone = getattr(model, "model", model)
    for layer in backbone.layers:
        if isinstance(layer.mlp, ExpertParallelMoe):
            raise ValueError("this model is already expert parallel")
        if not isinstance(getattr(layer.mlp.experts, "gate_up_proj", None), nn.Parameter):
            raise ValueError("expert_parallel needs floating-point experts: apply it before quantize()")
        layer.mlp = ExpertParallelMoe(layer.mlp, group)
        if getattr(model, "tp_world_size", 1) != 1:  # the block it replaces carried the MoE's all-reduce
            layer.mlp.register_forward_hook(all_reduce_first(model.tp_group))
    return model
