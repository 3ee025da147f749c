"""Result rows → console table, CSV file, PNG plot."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

ENV_COLUMNS = (
    "date",
    "device",
    "device_name",
    "cpu_model",
    "threads",
    "cpu_count",
    "load_avg_start",
    "torch",
    "triton",
    "python",
    "smes_fused",
    "smes_cpu_isa",
    "torch_cpu_capability",
    "git_commit",
    "command",
)
RESULT_COLUMNS = (
    "shape_set",
    "param_dtype",
    "projection",
    "clip",
    "smes_state_dtype",
    "set_source",
    "n_params",
    "n_tensors",
    "exponent",
    "competitor",
    "bytes_per_param",
    "ms_per_step",
    "ms_q1",
    "ms_q3",
    "params_per_s",
    "gb_per_s",
    "pct_of_roofline",
    "roofline",
    "speedup_vs_fused_adamw",
    "state_bytes",
    "peak_mem_bytes",
    "peak_mem_method",
    "first_step_s",
    "load_avg_1m",
    "warmup",
    "repeats",
)
COLUMNS = ENV_COLUMNS + RESULT_COLUMNS

# Console columns: header, row key, width, format spec, scale.
_TABLE = (
    ("p", "exponent", 6, "g", 1),
    ("competitor", "competitor", 31, "", None),
    ("ms/step", "ms_per_step", 9, ".2f", 1),
    ("Mparam/s", "params_per_s", 9, ".0f", 1e-6),
    ("B/param", "bytes_per_param", 7, "g", None),
    ("GB/s", "gb_per_s", 7, ".1f", 1),
    ("%roof", "pct_of_roofline", 6, ".0f", 1),
    ("x fused", "speedup_vs_fused_adamw", 8, ".2f", 1),
    ("state MB", "state_bytes", 9, ".1f", 1e-6),
    ("peak MB", "peak_mem_bytes", 8, ".1f", 1e-6),
    ("1st step s", "first_step_s", 10, ".2f", 1),
)


def _header() -> str:
    return " ".join(f"{h:<{w}}" if k == "competitor" else f"{h:>{w}}" for h, k, w, _, _ in _TABLE)


def _cells(row: dict) -> str:
    out = []
    for _, key, width, spec, scale in _TABLE:
        v = row[key]
        if key == "competitor":
            out.append(f"{v:<{width}}")
        elif isinstance(v, float) and math.isnan(v):
            out.append("-".rjust(width))
        else:
            out.append(format(v * scale if scale else v, f">{width}{spec}"))
    return " ".join(out)


def table(rows: Sequence[dict]) -> str:
    """One block per shape set: a title line, then one line per (exponent, competitor)."""
    lines = []
    for name in dict.fromkeys(r["shape_set"] for r in rows):
        block = [r for r in rows if r["shape_set"] == name]
        first = block[0]
        lines += [
            "",
            f"{name}: {first['n_params'] / 1e6:.2f}M params in {first['n_tensors']} tensors"
            f" ({first['set_source']})",
            _header(),
        ]
        for i, r in enumerate(block):
            if i and r["exponent"] != block[i - 1]["exponent"]:
                lines.append("")
            lines.append(_cells(r))
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: Sequence[dict], path: str) -> None:
    """GB/s by shape set (x) and competitor (bars), one panel per exponent; the roofline of
    each set is the black line across its group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["shape_set"] for r in rows))
    exponents = list(dict.fromkeys(r["exponent"] for r in rows))
    names = list(dict.fromkeys(r["competitor"] for r in rows if not _is_roofline(r)))
    value = {(r["shape_set"], r["exponent"], r["competitor"]): r["gb_per_s"] for r in rows}
    roof = {(r["shape_set"], r["exponent"]): r["gb_per_s"] for r in rows if _is_roofline(r)}
    roof_name = next((r["competitor"] for r in rows if _is_roofline(r)), "roofline")

    ncols = min(len(exponents), 2)
    nrows = math.ceil(len(exponents) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(7 * ncols, 3.6 * nrows), squeeze=False, sharey=True
    )
    for ax, p in zip(axes.flat, exponents, strict=False):
        # Only the competitors of this panel get a slot; colours stay the same across panels.
        here = [n for n in names if any((s, p, n) in value for s in sets)]
        width = 0.8 / len(here)
        for j, name in enumerate(here):
            xs = [i - 0.4 + (j + 0.5) * width for i in range(len(sets))]
            ys = [value.get((s, p, name), 0.0) for s in sets]
            ax.bar(xs, ys, width, label=name, color=f"C{names.index(name)}")
        for i, s in enumerate(sets):
            if (s, p) in roof:
                ax.hlines(roof[(s, p)], i - 0.45, i + 0.45, colors="k", label=roof_name)
        ax.set_title(f"exponent p = {p:g}" + (" (20 B/param for SMES)" if p == 0 else ""))
        ax.set_xticks(range(len(sets)), sets, rotation=20, fontsize=8)
        ax.set_ylabel("GB/s (28 B/param fp32)")
        ax.grid(axis="y", alpha=0.3)
    first = rows[0]
    fig.suptitle(
        f"Optimizer step throughput on {first['device_name']}, {first['threads']} threads, "
        f"torch {first['torch']}, commit {first['git_commit']}",
        fontsize=10,
    )
    legend = {}
    for ax in axes.flat[: len(exponents)]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, h)
    spare = axes.flat[len(exponents) :]
    for ax in spare:
        ax.axis("off")
    if len(spare):
        spare[0].legend(legend.values(), legend.keys(), loc="center", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.96))
    else:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8)
        fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _is_roofline(row: dict) -> bool:
    return row["competitor"].startswith("roofline")
