"""A benchmark CSV → the README's summary table (markdown).

    python -m bench.summary results/bench_cpu.csv [--backend cpu]

One row per shape set, one column per exponent. Each cell is the SMES backend's speedup over
``torch.optim.AdamW(fused=True)`` (the median of the per-round ratios), the two median step times
(SMES vs AdamW) and SMES's share of the cell's measured roofline; **bold** where SMES is slower
(below 1.00× as printed).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence

BASELINE = "AdamW fused"
# the columns the table and its header read
NEEDED = ("competitor", "shape_set", "exponent", "speedup_vs_fused_adamw", "ms_per_step",
          "pct_of_roofline", "n_params", "n_tensors", "command", "git_commit", "device_name",
          "threads")  # fmt: skip


def _num(x: str) -> float:
    return float(x) if x not in ("", "nan") else float("nan")


def markdown(rows: Sequence[dict], backend: str = "cpu") -> str:
    """The summary table of SMES ``backend`` over fused AdamW, from CSV rows (dicts of str)."""
    smes = f"SMES {backend}"
    sets = list(dict.fromkeys(r["shape_set"] for r in rows))
    exps = list(dict.fromkeys(r["exponent"] for r in rows))
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["shape_set"], r["exponent"]), {})[r["competitor"]] = r
    if not any(smes in c for c in cells.values()):
        raise SystemExit(f"no '{smes}' rows in this CSV (competitors: "
                         f"{sorted({r['competitor'] for r in rows})})")  # fmt: skip

    def cell(s: str, e: str) -> str:
        c = cells.get((s, e), {})
        if smes not in c or BASELINE not in c:
            return "-"
        x = _num(c[smes]["speedup_vs_fused_adamw"])
        ms, base = _num(c[smes]["ms_per_step"]), _num(c[BASELINE]["ms_per_step"])
        roof = _num(c[smes]["pct_of_roofline"])
        ratio = f"{x:.2f}×"
        if float(f"{x:.2f}") < 1:  # bold as shown: 0.996 prints as 1.00×, not bold
            ratio = f"**{ratio}**"
        share = "" if math.isnan(roof) else f", {roof:.0f}%"  # no roofline: 16-bit on CPU
        return f"{ratio} ({ms:.1f} vs {base:.1f} ms{share})"

    head = "| shape set | params / tensors | " + " | ".join(f"p = {e}" for e in exps) + " |"
    lines = [head, "|---|---|" + "---|" * len(exps)]
    for s in sets:
        first = next(r for r in rows if r["shape_set"] == s)
        size = f"{int(first['n_params']) / 1e6:.1f}M / {first['n_tensors']}"
        lines.append(f"| {s} | {size} | " + " | ".join(cell(s, e) for e in exps) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__)
    ap.add_argument("csv", help="a CSV written by python -m bench")
    ap.add_argument("--backend", default="cpu", help="the SMES backend to summarise (default cpu)")
    args = ap.parse_args(argv)
    try:
        with open(args.csv, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        ap.error(f"cannot read {args.csv}: {e.strerror}")
    except (UnicodeDecodeError, csv.Error) as e:
        ap.error(f"{args.csv} is not a CSV ({type(e).__name__})")
    if not rows or "competitor" not in rows[0]:
        ap.error(f"{args.csv} has no rows written by python -m bench")
    missing = [c for c in NEEDED if c not in rows[0]]
    if missing:
        ap.error(f"{args.csv} lacks the column(s) {', '.join(missing)} of python -m bench")
    r = rows[0]
    where = (
        f"{r['command']}, commit {r['git_commit']}, {r['device_name']}, {r['threads']} threads, "
        f"CPU kernel sets: SMES {r.get('smes_cpu_isa', '?')}, "
        f"torch {r.get('torch_cpu_capability', '?')}"
    )
    try:
        table = markdown(rows, args.backend)  # before anything is printed
    except ValueError as e:
        ap.error(f"{args.csv}: a value that is not a number ({e})")
    print(f"<!-- python -m bench.summary {args.csv}: {where} -->")
    print(table)


if __name__ == "__main__":
    main()
