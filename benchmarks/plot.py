"""Bar charts of bench.py's results: decode (batch 1) and prefill tokens/s per engine and dtype.

    python benchmarks/plot.py [benchmarks/out/bench.json] [out.png]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

COLORS = {"ours": "#1f77b4", "ours compiled": "#17becf", "TF default": "#ff7f0e", "TF eager": "#ffbb78",
          "llama.cpp": "#2ca02c"}


def plot(data: dict[str, Any], path: str) -> None:
    """Two panels (decode b1 with the roofline per dtype, prefill), dtypes on the x axis, one bar per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    dtypes = [d for d in ("fp32", "bf16", "int8", "int4") if any(r["dtype"] == d for r in rows)]
    labels = [lab for lab in COLORS if any(r["label"] == lab for r in rows)]
    width = 0.8 / max(len(labels), 1)
    s = data["settings"]
    gpu = data.get("device", "cpu") != "cpu"
    panels = [("decode_b1_tps", f"decode, batch 1 ({s['prompt_len']}-token prompt, {s['new_tokens']} tokens)"),
              ("prefill_tps", f"prefill, {s['prefill_len']}-token prompt")]
    if gpu:  # a GPU's batched decode is its own story; its b1 roofline (10x the bars) is printed, not drawn
        b = max(s["batches"])
        panels.insert(1, (f"decode_b{b}_tps", f"decode, batch {b} ({s['batch_new_tokens']} tokens each)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5))
    for ax, (key, title) in zip(axes, panels):
        for j, label in enumerate(labels):
            for i, dtype in enumerate(dtypes):
                r = next((r for r in rows if r["label"] == label and r["dtype"] == dtype), None)
                if r is None:
                    continue
                x = i + (j - (len(labels) - 1) / 2) * width
                value = r.get(key)
                if value is None:
                    ax.text(x, 0, " failed" if r.get("errors") else " n/a", rotation=90, ha="center",
                            va="bottom", fontsize=8, color="red")
                    continue
                ax.bar(x, value, width, color=COLORS[label])
                ax.text(x, value, f"{value:.1f}" if value < 100 else f"{value:.0f}", ha="center", va="bottom",
                        fontsize=8)
        if key == "decode_b1_tps" and not gpu:
            bw = data["bandwidth"]["used_GBps"] * 1e9
            for i, dtype in enumerate(dtypes):
                roof = bw / data["active_bytes_per_token"][dtype]
                ax.hlines(roof, i - 0.45, i + 0.45, colors="black", linestyles="dashed")
        names = ["int8 / Q8_0" if d == "int8" else "int4 / Q4_0" if d == "int4" else d for d in dtypes]
        if key == "decode_b1_tps":
            names = [f"{n}\nroofline {data['bandwidth']['used_GBps'] * 1e9 / data['active_bytes_per_token'][d]:.0f}"
                     for n, d in zip(names, dtypes)]
        ax.set_xticks(range(len(dtypes)))
        ax.set_xticklabels(names)
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS[lab], label=lab) for lab in labels]
    if not gpu:
        handles.append(Line2D([], [], color="black", linestyle="dashed", label="roofline (bandwidth / active bytes)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    load = data.get("load_average_start", [0])[0]
    where = data.get("device_name") if gpu else f"CPU, {data['threads']} threads"
    fig.suptitle(f"Mixtral bench config (791M params, 230M active), {where}, median of "
                 f"{s['repeats']} round(s), load average {load:.2f} at start"
                 + (" (machine busy: not meaningful)" if load > 1 else ""))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                             "bench.json")
    with open(src) as f:
        plot(json.load(f), sys.argv[2] if len(sys.argv) > 2 else os.path.splitext(src)[0] + ".png")
