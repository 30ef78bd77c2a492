"""bench.py's tables: results per engine and dtype, ratios against the baselines, and the issue's targets."""

from __future__ import annotations

from typing import Any

import common as C

MEASURES = [("decode_b1_tps", "decode b1"), ("prefill_tps", "prefill"), ("decode_b8_tps", "decode b8"),
            ("decode_b32_tps", "decode b32"), ("ttft_s", "TTFT"), ("load_s", "load"),
            ("peak_rss_decode_b1", "peak RSS b1")]
LOWER_IS_BETTER = {"ttft_s", "load_s", "peak_rss_decode_b1"}
BASELINES = ("TF default", "TF eager", "llama.cpp")


def _row(rows: list[dict], label: str, dtype: str) -> dict | None:
    return next((r for r in rows if r["label"] == label and r["dtype"] == dtype), None)


def _best(rows: list[dict], engine: str, dtype: str, key: str) -> tuple[float | None, str]:
    """The better of an engine's variants for one measure (Transformers' two experts implementations; ours eager
    and compiled), with its label."""
    cands = [(r[key], r["label"]) for r in rows if r["engine"] == engine and r["dtype"] == dtype and r.get(key)]
    if not cands:
        return None, engine
    return (min if key in LOWER_IS_BETTER else max)(cands)


def _speedup(ours: float | None, theirs: float | None, key: str) -> float | None:
    """> 1 means ours is better: faster, or less time, or less memory."""
    if not ours or not theirs:
        return None
    return theirs / ours if key in LOWER_IS_BETTER else ours / theirs


OURS = ("ours", "ours compiled")


def ratios(rows: list[dict], s: Any) -> dict[str, dict[str, dict[str, float | None]]]:
    """{"<ours label> <dtype>": {measure: {baseline: ours / baseline}}}."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for dtype in C.DTYPES:
        for label in OURS:
            ours = _row(rows, label, dtype)
            if ours is None:
                continue
            out[f"{label} {dtype}"] = {key: {b: _speedup(ours.get(key), (_row(rows, b, dtype) or {}).get(key), key)
                                             for b in BASELINES} for key, _ in MEASURES}
    return out


def targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, each MET, NOT MET, or n/a with the reason; ours is its faster variant (eager or
    compiled) for each measure, named in brackets."""
    out = []

    def add(name: str, value: float | None, goal: float, op: str = ">=", which: str | None = None) -> None:
        met = value is not None and (value >= goal if op == ">=" else value <= goal)
        out.append({"target": name + (f" [{which}]" if which and value is not None else ""), "value": value,
                    "goal": goal, "op": op,
                    "status": "n/a (not measured)" if value is None else "MET" if met else "NOT MET"})

    def versus(dtype: str, key: str, theirs: float | None) -> tuple[float | None, str]:
        ours, which = _best(rows, "ours", dtype, key)
        return _speedup(ours, theirs, key), which

    def versus_tf(dtype: str, key: str) -> tuple[float | None, str]:
        return versus(dtype, key, _best(rows, "tf", dtype, key)[0])

    for dtype in ("fp32", "bf16", "int8"):
        llama = (_row(rows, "llama.cpp", dtype) or {}).get("decode_b1_tps")
        ratio, which = versus(dtype, "decode_b1_tps", llama)
        add(f"decode b1 {dtype}: ours / llama.cpp", ratio, 1.0, which=which)
    for dtype, goal in (("fp32", 2.0), ("bf16", 3.0)):
        ratio, which = versus_tf(dtype, "decode_b1_tps")
        add(f"decode b1 {dtype}: ours / best TF", ratio, goal, which=which)
    _, which = _best(rows, "ours", "bf16", "decode_b1_tps")
    pct = (_row(rows, which, "bf16") or {}).get("decode_b1_roofline_pct")
    add("decode b1 bf16: ours / roofline", None if pct is None else pct / 100, 0.85, which=which)
    for dtype in ("fp32", "bf16"):
        ratio, which = versus_tf(dtype, "prefill_tps")
        add(f"prefill {dtype}: ours / best TF", ratio, 1.2, which=which)
    for dtype in ("fp32", "bf16"):
        ratio, which = versus_tf(dtype, "decode_b32_tps")
        add(f"decode b32 {dtype}: ours / best TF", ratio, 3.0, which=which)
    for dtype in C.DTYPES:
        for label in OURS:
            ours = _row(rows, label, dtype)
            if ours is not None:
                add(f"peak RSS decoding b1 {dtype}: {label} / (weights + KV)", ours.get("rss_over_weights_kv"), 1.15,
                    "<=")
    return out


def versions(llama_version: str | None) -> dict[str, str | None]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "llama_cpp_python": llama_version}


def render(rows: list[dict], check: dict, bw: dict, bw_end: dict, bandwidth: float, cfg: dict, s: Any,
           notes: list[str]) -> str:
    parts = []
    gpu = s.device != "cpu"
    if gpu:
        parts.append(f"device: {bw.get('device_name')} ({C.fmt(bw.get('device_memory_GiB'), 0)} GiB); memory "
                     f"bandwidth (1 GiB device copy, bytes read + written): {C.fmt(bw.get('copy_GBps'), 0)} GB/s at "
                     f"the start, {C.fmt(bw_end.get('copy_GBps'), 0)} at the end; roofline uses "
                     f"{bandwidth / C.GB:.0f} GB/s")
    else:
        parts.append(f"read bandwidth (sum of 1 GiB fp32, {C.THREADS} threads): torch "
                     f"{C.fmt(bw.get('torch_sum_GBps'))} GB/s, numpy {C.fmt(bw.get('numpy_sum_GBps'))} GB/s at the "
                     f"start; torch {C.fmt(bw_end.get('torch_sum_GBps'))}, numpy {C.fmt(bw_end.get('numpy_sum_GBps'))}"
                     f" at the end; roofline uses {bandwidth / C.GB:.1f} GB/s")
    parts.append("bytes read per decoded token (active weights: attention, router, norms, 2 of 8 experts, LM head, "
                 "1 embedding row; int8/int4 as Q8_0/Q4_0): " + ", ".join(
                     f"{d} {C.active_bytes_per_token(cfg, d) / 1e6:.0f} MB -> roofline "
                     f"{bandwidth / C.active_bytes_per_token(cfg, d):.1f} tok/s" for d in C.DTYPES))

    ours = [r for r in rows if r["label"] == "ours"]  # greedy tokens are compared with ours fp32, else ours eager
    ref_row = next((r for r in ours if r["dtype"] == "fp32"), ours[0] if ours else None)
    ref, ref_name = (ref_row.get("tokens"), f"ours {ref_row['dtype']}") if ref_row else (None, "-")
    table = []
    for r in rows:
        same = None
        if ref and r.get("tokens"):
            same = next((i for i, (a, b) in enumerate(zip(ref, r["tokens"])) if a != b), len(ref))
        label = r["label"] + (f" ({r['experts_implementation']})" if r["engine"] == "tf" and r["impl"] is None
                              and r.get("experts_implementation") else "")
        table.append([label, r["dtype"], C.fmt(r["load_s"]), C.fmt(r["ttft_s"] and r["ttft_s"] * 1000, 0),
                      C.fmt(r["decode_b1_tps"], 2), C.fmt(r["decode_b1_roofline_pct"], 0),
                      C.fmt(r["prefill_tps"], 0), C.fmt(r.get("decode_b8_tps")), C.fmt(r.get("decode_b32_tps")),
                      C.fmt(r["peak_rss_decode_b1"] and r["peak_rss_decode_b1"] / C.GB, 2),
                      C.fmt(r["weight_bytes"] and r["weight_bytes"] / C.GB, 2),
                      C.fmt(r.get("rss_over_weights_kv"), 2),
                      "-" if same is None else f"{same}/{len(ref)}"])
    parts.append(f"\nmedian of {s.repeats} round(s); decode b1: {s.prompt_len}-token prompt, {s.new_tokens} tokens "
                 f"after the first; prefill: {s.prefill_len} tokens; batched: {s.batch_new_tokens} tokens after the "
                 "first; " + ("memory: peak GPU memory allocated by torch" if gpu else "RSS above the RSS after import")
                 + f"; 'greedy =' counts leading tokens equal to {ref_name}")
    mem = "GPU mem" if gpu else "RSS"
    parts.append(C.format_table(
        ["engine", "dtype", "load s", "TTFT ms", "decode b1 tok/s", "% roof", f"prefill-{s.prefill_len} tok/s",
         "b8 tok/s", "b32 tok/s", f"peak {mem} GB", "weights GB", f"{mem}/(W+KV)", "greedy ="], table))
    for r in rows:
        for e in r["errors"]:
            parts.append(f"  {r['label']} {r['dtype']}: {e}")

    rat = ratios(rows, s)
    rtable = []
    for variant, by_key in rat.items():
        for key, name in MEASURES:
            vals = by_key[key]
            if any(v is not None for v in vals.values()):
                rtable.append([f"{name}, {variant}", *(C.fmt(vals[b], 2) for b in BASELINES)])
    if rtable:
        parts.append("\nours against each baseline (> 1: ours faster, or less time / memory)")
        parts.append(C.format_table(["measure", *(f"vs {b}" for b in BASELINES)], rtable))

    parts.append("\ntargets")
    parts.append(C.format_table(["target", "measured", "goal", "status"],
                                [[t["target"], C.fmt(t["value"], 2), f"{t['op']} {t['goal']:.2f}", t["status"]]
                                 for t in targets(rows)]))

    if check:
        parts.append("\nlogits check, 16-token prompt, all positions, against ours fp32 (llama.cpp with an F32 KV "
                     "cache, no flash attention)" + (f": failed: {check['error']}" if "error" in check else ""))
        std = check.get("ref_logits_std") or 1.0
        crow = []
        for name, c in check.get("logits", {}).items():
            if "error" in c:
                crow.append([name, f"failed: {c['error']}", "", "", ""])
                continue
            # tight: an f32 file must match to float rounding; loose: mean error under 10% of the logits' spread
            tight = name in ("llama.cpp f32", "TF eager fp32")
            ok = c["max_abs_diff"] <= 1e-4 if tight else c["mean_abs_diff"] <= 0.1 * std
            crow.append([name, f"{c['max_abs_diff']:.2e}", f"{c['mean_abs_diff']:.2e}", C.fmt(100 * c["argmax_agree"], 0),
                         ("match (max <= 1e-4)" if ok else "MISMATCH (max > 1e-4)") if tight else
                         ("close (mean <= 0.1 std)" if ok else "FAR (mean > 0.1 std)")])
        if crow:
            parts.append(C.format_table(["vs ours fp32", "max |diff|", "mean |diff|", "argmax agree %", "verdict"],
                                        crow))
        if "ref_logits_std" in check:
            parts.append(f"our fp32 logits: std {check['ref_logits_std']:.3f}, mean top-1 margin "
                         f"{check['ref_top1_margin_mean']:.3f}; experts chosen (all layers, 16 tokens): "
                         f"{check.get('expert_use')}")
    if ref:
        parts.append(f"{ref_name} greedy output: {len(set(ref))} distinct of {len(ref)} tokens")
    parts += [f"note: {n}" for n in notes]
    return "\n".join(parts)
