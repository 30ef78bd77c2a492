"""The hot path of generation: prefill and one-token decode over a StaticCache, with no host syncs.

Shapes: B rows, S new tokens (P at prefill, 1 when decoding), L cache slots, H hidden, V vocabulary.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ..cache import StaticCache, StaticCacheView


def static_mask(kv_mask: torch.Tensor | None, cache_position: torch.Tensor, sliding_window: int | None,
                slots: int | None = None) -> torch.Tensor:
    """(B|1, 1, S, L) bool: query at slot cache_position[s] ((S,) for every row, or (B, S) per row) sees slot
    l <= it (within the window) that holds a real token. kv_mask (B, L) is False at padding (None: no padding, then
    `slots` gives L); slots not yet written are excluded by causality."""
    length = kv_mask.shape[1] if kv_mask is not None else slots
    l_idx = torch.arange(length, device=cache_position.device)  # (L,)
    q = cache_position[..., None]  # (S, 1) or (B, S, 1)
    allowed = l_idx <= q
    if sliding_window is not None:
        allowed = allowed & (l_idx > q - sliding_window)
    allowed = allowed[None, None] if allowed.dim() == 2 else allowed[:, None]  # (B|1, 1, S, L)
    return allowed if kv_mask is None else allowed & kv_mask[:, None, None, :]


def forward_last(model: Any, ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                 kv_mask: torch.Tensor | None, cache: StaticCache | StaticCacheView,
                 plain_causal: bool = False, slots: int | None = None) -> torch.Tensor:
    """Run ids (B, S) through the model, writing the cache at cache_position ((S,), or (B, S) per row); return fp32
    logits (B, V) of the last position.

    plain_causal: no padding, no window that bites and cache slots = positions, so attention needs no mask
    (sdpa's is_causal, which skips the blocks above the diagonal). kv_mask None: no padding, `slots` attended."""
    mask = None if plain_causal else static_mask(kv_mask, cache_position, model.config.sliding_window, slots)
    x = run_layers(model, ids, position_ids, cache_position, mask, cache)
    return logits_at(model, x[:, -1:])[:, -1]  # only the last position feeds the next token


def run_layers(model: Any, ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
               mask: torch.Tensor | None, cache: StaticCache | StaticCacheView) -> torch.Tensor:
    """ids (B, S) through the embedding and every decoder layer, writing the cache: (B, S, H) before the final
    norm. mask: (B|1, 1, S, L) bool, or None for plain causal attention."""
    backbone = model.model
    x = backbone.embed_tokens(ids)  # (B, S, H)
    cos, sin = backbone.rotary_emb(position_ids, x.dtype)
    for layer in backbone.layers:
        x, _, _ = layer(x, cos, sin, mask, cache, False, cache_position)
    return x


class RowsAndPack:
    """The cache of a step over `rows` decoding rows and a pack of prompt tokens together (run_mixed): the tokens are
    (1, N), the first `rows` one a row of row_cache (each at its position's slot), the other S = N - rows in
    pack_cache's one row at pack_slots (S,). It attends by itself (Attention.forward hands it q, k, v): each row over
    its own slots (row_mask (rows, 1, 1, L)), the pack under pack_mask ((1, 1, S, L'), None: plain causal)."""

    def __init__(self, rows: int, row_slots: torch.Tensor, row_cache: StaticCacheView, row_mask: torch.Tensor,
                 pack_slots: torch.Tensor, pack_cache: StaticCacheView, pack_mask: torch.Tensor | None) -> None:
        self.rows, self.row_slots, self.row_cache, self.row_mask = rows, row_slots, row_cache, row_mask
        self.pack_slots, self.pack_cache, self.pack_mask = pack_slots, pack_cache, pack_mask

    def attend(self, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, nh, N, D), k and v (1, nkv, N, D) of the step's tokens -> attention outputs (1, N, nh*D)."""
        rows, outs = self.rows, []
        if rows:  # (rows, nh, 1, D) against each row's cache
            k_new, v_new = (t[0, :, :rows, None].transpose(0, 1) for t in (k, v))  # (rows, nkv, 1, D)
            k_rows, v_rows = self.row_cache.update(k_new, v_new, attn.layer_idx, self.row_slots)
            out = attn.attend(q[0, :, :rows, None].transpose(0, 1), k_rows, v_rows, self.row_mask)[0]
            outs.append(out.reshape(1, rows, -1))
        if rows < q.shape[2]:  # the pack: (1, nh, S, D) against its own slots
            k_pack, v_pack = self.pack_cache.update(k[:, :, rows:], v[:, :, rows:], attn.layer_idx, self.pack_slots)
            out = attn.attend(q[:, :, rows:], k_pack, v_pack, self.pack_mask)[0]
            outs.append(out.transpose(1, 2).flatten(2))
        return torch.cat(outs, dim=1)


def run_mixed(model: Any, ids: torch.Tensor, positions: torch.Tensor, cache: RowsAndPack) -> torch.Tensor:
    """One forward over decoding rows and a pack of prompt tokens together (ids and positions (N,), laid out as
    `cache` says): every linear layer and the experts see the N tokens at once, their weights read once a step;
    only attention runs apart (RowsAndPack). Returns (N, H) before the final norm."""
    return run_layers(model, ids[None], positions[None], None, None, cache)[0]


def logits_at(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits (..., V) of hidden states (..., H) that run_layers returned."""
    return model.lm_head(model.model.norm(hidden)).float()


# Cache lengths are rounded up to this for compiled decoding: the step's shapes, hence its compiled graph, then
# serve every prompt and output length within a bucket (masked slots cost the attention kernel only a check).
COMPILED_CACHE_BUCKET = 256


def _signature(model: Any) -> tuple:
    """What the compiled step assumes about the model: its modules' types and train/eval modes, every tensor's
    dtype, shape, stride and device, and the config. Dynamo's own guards on these are skipped (they cost ~0.3 ms
    a decode step); this is checked once per generate() call instead."""
    modules = tuple((type(m), m.training) for m in model.modules())
    tensors = tuple((t.dtype, t.shape, t.stride(), t.device, t.requires_grad)
                    for t in (*model.parameters(), *model.buffers()))
    return modules, tensors, repr(sorted(vars(model.config).items()))


def compiled_forward_last(model: Any):
    """forward_last compiled with inductor (once per model state); if compiling fails, a warning and eager
    forward_last.

    The C++ wrapper (cpp_wrapper) calls the step's kernels from generated C++ rather than Python: on CPU, where
    a decode step is a few hundred small calls, that is about 1 ms of the step's Python overhead gone. Guards on
    the model's modules and parameters are skipped for another 0.3 ms: a model changed since (quantized, cast,
    its config edited) gets a new compiled step, by _signature, rather than a stale one."""
    if _host_syncs(model):
        warnings.warn("compile=True: the offloaded experts are read from disk in the middle of the decode step, "
                      "which a compiled step cannot hold: decoding eagerly", stacklevel=3)
        return forward_last
    signature = _signature(model)
    cached = getattr(model, "_compiled_forward_last", None)
    if cached is not None and cached[0] in (signature, None):  # None: compiling failed, eager for good
        return cached[1]
    # isolate_recompiles: this model state's compiled steps are its own, never those of another torch.compile
    # call of forward_last, whose skipped guards could not tell the models apart
    compiled = torch.compile(forward_last, dynamic=False, isolate_recompiles=True, options={
        "cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    failed = False

    def fn(*args: Any) -> torch.Tensor:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args)
            except Exception as e:  # inductor needs a C++ toolchain and may not support every op
                warnings.warn(f"torch.compile of the decode step failed, decoding eagerly: {type(e).__name__}: {e}",
                              stacklevel=2)
                failed = True
                model._compiled_forward_last = (None, forward_last)
        return forward_last(*args)

    model._compiled_forward_last = (signature, fn)
    return fn


# ---- CUDA: the decode step as a graph -----------------------------------------------------------------------------
GRAPHS_KEPT = 4  # (batch, cache length) shapes whose graph and cache a model keeps for later generate() calls


class GraphedStep:
    """forward_last for one-token steps, recorded once as a CUDA graph and replayed: a step's few hundred kernel
    launches become one, and launches, not bytes, bound a small model's decode on a GPU.

    The graph holds the addresses of the model's tensors and of its inputs, so it owns its StaticCache and input
    buffers (ids, positions, cache_position, kv_mask): a generate() call writes its mask into `kv_mask`, prefills
    into `cache`, then calls this with each step's values. Slots left from an earlier call are masked by causality
    until the new call writes them. The cache serves one generation at a time: while one uses it (`in_use`), another
    generate() of the same shape decodes eagerly."""

    def __init__(self, model: Any, batch: int, slots: int, step: Callable[..., torch.Tensor] = forward_last) -> None:
        self.cache = StaticCache.for_model(model, batch, slots)
        device = self.cache.keys[0].device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        self.kv_mask = torch.ones(batch, slots, dtype=torch.bool, device=device)
        # the warm-up run writes slot 0 of the fresh cache: the prefill overwrites it
        self.graph, self.logits = record_graph(
            lambda: step(model, self.ids, self.positions, self.cache_position, self.kv_mask, self.cache), device)
        self.in_use = False  # a generate() is decoding with it: set by graphed_step, cleared by the generation

    def __call__(self, model: Any, ids: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor,
                 kv_mask: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        assert cache is self.cache and kv_mask is self.kv_mask, "a graphed step runs on its own cache and mask"
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.cache_position.copy_(cache_position)
        self.graph.replay()
        return self.logits


def record_graph(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[Any, torch.Tensor]:
    """(a CUDA graph of step(), the output tensor that each replay rewrites). step() runs once before the capture,
    on a side stream (lazy cuBLAS handles, workspaces), as torch asks: it must be harmless to run."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


# why graphable() can say no, for the warnings that then decode eagerly
NOT_GRAPHABLE = ("which needs bf16 experts and torch's grouped GEMM kernel (Hopper or Blackwell GPUs): "
                 "decoding eagerly")


def graphable(model: Any) -> bool:
    """Whether the decode step can be a CUDA graph: on a GPU with no host sync, which the experts do only in bf16
    with torch's grouped GEMM kernel (Experts.runs_grouped)."""
    from ..model.moe import Experts

    p = next(model.parameters())
    probe = torch.empty(1, model.config.hidden_size, dtype=p.dtype, device=p.device)
    return not _host_syncs(model) and all(m.runs_grouped(probe) for m in model.modules() if isinstance(m, Experts))


def _host_syncs(model: Any) -> bool:
    """Whether a module decides on the host in the middle of the step (mixtral.offload's experts read from disk)."""
    return any(getattr(m, "host_syncs", False) for m in model.modules())


def graphed_step(model: Any, batch: int, slots: int) -> GraphedStep | None:
    """The model's GraphedStep for this shape (recorded on first use, kept for later calls while the model is
    unchanged), marked in use; None with a warning where the step cannot be a graph (it must run on a GPU with no
    host sync, which the experts do only in bf16 with torch's grouped GEMM kernel: Experts.runs_grouped), and None
    without one while another generation uses this shape's graph."""
    if not graphable(model):
        warnings.warn(f"compile=True on {model.device} records the decode step as a CUDA graph, {NOT_GRAPHABLE}",
                      stacklevel=3)
        return None
    signature = _signature(model)
    kept = getattr(model, "_graphed_steps", None)
    if kept is None or kept[0] != signature:  # a changed model (cast, moved, quantized) drops its old graphs
        kept = model._graphed_steps = (signature, {})
    steps = kept[1]
    step = steps.pop((batch, slots), None)
    if step is not None and step.in_use:  # another generation is decoding with this graph's cache
        steps[(batch, slots)] = step
        return None
    if step is None:
        try:
            step = GraphedStep(model, batch, slots)
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured: decode eagerly, as compile does
            warnings.warn(f"recording the decode step as a CUDA graph failed, decoding eagerly: {type(e).__name__}: "
                          f"{e}", stacklevel=3)
            return None
    steps[(batch, slots)] = step  # most recently used last
    while len(steps) > GRAPHS_KEPT:
        steps.pop(next(iter(steps)))
    step.in_use = True
    return step
