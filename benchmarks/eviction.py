"""Which experts to keep: eviction policies replayed on routing traces, hit rate at each number of slots a layer.

    python benchmarks/eviction.py [--tokens 1024]

Traces (token by token, layer by layer, the top-2 experts each): the demo model (SmolLM2 upcycled: real hidden
states of real English, the README, under its seeded router), its first half shuffled by token
(the same load, no order in time), and uniform random routing (what the 8x7B-shaped benchmark checkpoint gives).
Policies, each holding S experts a layer (the same memory), misses read before the step, as OffloadedExperts does:
- LRU: least recently used within the layer (ours).
- LFU: least often used within the layer, the least recent among ties; uses count with a half-life of 256 of the
  layer's steps (so that a server's changing load is followed), as OffloadedExperts counts them.
- LFU, no decay: uses counted since the start.
- global LRU: the same S x layers slots shared by all layers, least recently used first: what the kernel's page
  cache does for a memory-mapped file. Layers run in order, so the least recent expert is the next layer's.
- Belady: evicts the expert needed furthest in the future (knows the trace): the bound no policy passes.
Writes benchmarks/out/eviction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import OrderedDict

import common as C

DECAY = 2 ** (1 / 256)
Trace = list[list[tuple[int, ...]]]  # trace[t][layer] = the experts token t routes to in that layer


def demo_trace(tokens: int) -> tuple[Trace, int]:
    import torch

    from mixtral import AutoTokenizer, MixtralForCausalLM
    from mixtral.demo import demo_model_path

    path = demo_model_path(progress=False)
    model, tok = MixtralForCausalLM.from_pretrained(path, progress=False), AutoTokenizer.from_pretrained(path)
    root = os.path.dirname(C.HERE)
    text = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :tokens]
    picks: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: picks.append(out[2]))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    per_layer = [p.tolist() for p in picks]  # [layer][t] = experts
    return [[tuple(per_layer[layer][t]) for layer in range(len(per_layer))] for t in range(ids.shape[1])], \
        model.config.num_local_experts


def uniform_trace(tokens: int, layers: int, experts: int, k: int = 2, seed: int = 0) -> Trace:
    rng = random.Random(seed)
    return [[tuple(rng.sample(range(experts), k)) for _ in range(layers)] for _ in range(tokens)]


def per_layer(trace: Trace, slots: int, policy: str) -> float:
    """Hit rate of LRU, LFU or Belady, with `slots` experts a layer."""
    hits = total = 0
    for layer in range(len(trace[0])):
        uses = [trace[t][layer] for t in range(len(trace))]
        resident: OrderedDict[int, None] = OrderedDict()  # least recent first
        counts: dict[int, float] = {}
        for t, step in enumerate(uses):
            for e in step:  # LFU's weights grow by 2^(1/256) a step rather than all counts decaying
                counts[e] = counts.get(e, 0) + (DECAY ** t if policy == "LFU" else 1)
            total += len(step)
            hits += sum(e in resident for e in step)
            for e in step:
                if e in resident:
                    resident.move_to_end(e)
                    continue
                if len(resident) >= slots:
                    candidates = [r for r in resident if r not in step]
                    if policy == "LRU":
                        victim = candidates[0]
                    elif policy.startswith("LFU"):
                        victim = min(candidates, key=lambda r: counts[r])  # min keeps the least recent of ties
                    else:  # Belady: the one needed furthest ahead (or never)
                        def next_use(r: int) -> int:
                            return next((u for u in range(t + 1, len(uses)) if r in uses[u]), len(uses))
                        victim = max(candidates, key=next_use)
                    del resident[victim]
                resident[e] = None
    return hits / total


def global_lru(trace: Trace, slots: int) -> float:
    """Hit rate of one LRU over slots x layers entries, keyed by (layer, expert), in the order the layers run."""
    capacity = slots * len(trace[0])
    resident: OrderedDict[tuple[int, int], None] = OrderedDict()
    hits = total = 0
    for step in trace:
        for layer, experts in enumerate(step):
            for e in experts:
                key = (layer, e)
                total += 1
                if key in resident:
                    hits += 1
                    resident.move_to_end(key)
                else:
                    if len(resident) >= capacity:
                        resident.popitem(last=False)
                    resident[key] = None
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    demo, experts = demo_trace(args.tokens)
    shuffled = demo[:]
    random.Random(0).shuffle(shuffled)
    traces = {"demo model, English": demo, "demo model, tokens shuffled": shuffled,
              "uniform random": uniform_trace(len(demo), len(demo[0]), experts)}
    policies = ["LRU", "LFU", "LFU, no decay", "global LRU", "Belady"]
    rows, results = [], {}
    for name, trace in traces.items():
        for slots in range(2, experts):
            rates = {p: global_lru(trace, slots) if p == "global LRU" else per_layer(trace, slots, p)
                     for p in policies}
            results.setdefault(name, {})[slots] = rates
            rows.append([name, f"{slots} of {experts}", *(C.fmt(rates[p], 3) for p in policies)])
    print(f"hit rate by policy; {len(demo)} tokens x {len(demo[0])} layers, top-2 of {experts}")
    print(C.format_table(["trace", "slots a layer", *policies], rows))
    C.write_json(os.path.join(C.OUT_DIR, "eviction.json"), {"tokens": len(demo), "results": results})


if __name__ == "__main__":
    main()
