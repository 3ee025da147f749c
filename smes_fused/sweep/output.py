"""CSV files, the console table and the two plots of a sweep."""

from __future__ import annotations

import csv

import numpy as np


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def ratio_columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k.startswith("ratio_")]


def aggregate(rows: list[dict], key: str) -> dict[float, tuple[float, float]]:
    """Per p: (mean, std) of ``key`` over seeds (population std; 0 for one seed)."""
    out = {}
    for p in sorted({r["p"] for r in rows}):
        v = np.array([r[key] for r in rows if r["p"] == p], dtype=np.float64)
        out[p] = (float(np.mean(v)), float(np.std(v)))
    return out


def summary_table(rows: list[dict], lr_grid: list[dict] | None = None) -> str:
    cols = [
        ("train_loss", "train loss", 1.0, ".3f"),
        ("train_acc", "train acc %", 100.0, ".1f"),
        ("test_acc", "test acc %", 100.0, ".2f"),
        ("gap_acc", "gap acc %", 100.0, ".2f"),
        ("gap_loss", "gap loss", 1.0, ".3f"),
        ("out_in", "out/in ratio", 1.0, ".2f"),
    ]
    ps = sorted({r["p"] for r in rows})
    n_seeds = len({r["seed"] for r in rows})
    head = ["p", "lr"] + [c[1] for c in cols]
    body = []
    for p in ps:
        rs = [r for r in rows if r["p"] == p]
        line = [f"{p:g}", f"{rs[0]['lr']:.3g}"]
        edge = ""
        if lr_grid:
            lrs = sorted({r["lr"] for r in lr_grid if r["p"] == p})
            if len(lrs) > 1 and rs[0]["lr"] in (lrs[0], lrs[-1]):
                edge = "*"
        line[1] += edge
        for key, _, scale, fmt in cols:
            v = np.array([r[key] for r in rs], dtype=np.float64) * scale
            line.append(f"{np.mean(v):{fmt}} ± {np.std(v):{fmt}}")
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt_line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True))  # noqa: E731
    lines = [fmt_line(head), fmt_line(["-" * w for w in widths])]
    lines += [fmt_line(b) for b in body]
    lines.append(
        f"mean ± std over {n_seeds} seed(s); lr selected per p on the validation split"
        + (" (* = edge of the lr grid)" if any("*" in b[1] for b in body) else "")
    )
    return "\n".join(lines)


def _p_colors(ps):
    import matplotlib

    cmap = matplotlib.colormaps["plasma"]  # truncated: its yellow end is hard to see
    lo, hi = min(ps), max(ps)
    return {p: cmap(0.0 if hi == lo else 0.85 * (p - lo) / (hi - lo)) for p in ps}


def plot_accuracy(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = sorted({r["p"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, marker in (("test_acc", "test", "o"), ("train_acc", "train", "s")):
        a = aggregate(rows, key)
        ax1.errorbar(
            ps,
            [100 * a[p][0] for p in ps],
            yerr=[100 * a[p][1] for p in ps],
            marker=marker,
            capsize=4,
            label=f"{label} accuracy",
        )
    ax1.set_xlabel("balance coefficient p")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title("accuracy vs p (mean ± std over seeds)")
    ax1.legend()
    for key, label, marker in (("gap_acc", "train acc − test acc (%)", "o"),):
        a = aggregate(rows, key)
        ax2.errorbar(
            ps,
            [100 * a[p][0] for p in ps],
            yerr=[100 * a[p][1] for p in ps],
            marker=marker,
            capsize=4,
            color="C3",
            label=label,
        )
    ax2.set_xlabel("balance coefficient p")
    ax2.set_ylabel("accuracy gap (%)", color="C3")
    a = aggregate(rows, "gap_loss")
    ax2b = ax2.twinx()
    ax2b.errorbar(
        ps,
        [a[p][0] for p in ps],
        yerr=[a[p][1] for p in ps],
        marker="s",
        capsize=4,
        color="C2",
        label="test loss − train loss",
    )
    ax2b.set_ylabel("loss gap", color="C2")
    ax2.set_title("generalisation gap vs p")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="best")
    for ax in (ax1, ax2):
        ax.axvline(0.0, color="grey", lw=0.7, ls=":")
        ax.axvline(0.5, color="grey", lw=0.7, ls=":")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ratio_columns(rows)
    names = [c[len("ratio_") :] for c in cols]
    ps = sorted({r["p"] for r in rows})
    colors = _p_colors(ps)
    x = np.arange(len(cols))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in ps:
        prof = np.array([[r[c] for c in cols] for r in rows if r["p"] == p], dtype=np.float64)
        mean = prof.mean(axis=0)
        lr = next(r["lr"] for r in rows if r["p"] == p)
        ax1.plot(x, mean, marker="o", color=colors[p], label=f"p={p:g} (lr {lr:.3g})")
        # shape only: divide by the profile's geometric mean over layers (lr drops out)
        ax2.plot(x, mean / np.exp(np.log(mean).mean()), marker="o", color=colors[p])
    ax1.set_yscale("log")
    ax1.set_ylabel("mean ‖Δθ‖ / ‖θ‖ per step")
    ax1.set_title("per-layer update/weight ratio")
    ax2.set_yscale("log")
    ax2.set_ylabel("ratio / its geometric mean over layers")
    ax2.set_title("profile shape (lr-independent)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names)
        ax.set_xlabel("layer (input → output)")
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_title(rows: list[dict]) -> str:
    r = rows[0]
    bn = "" if r.get("batchnorm", 1) else " (no BatchNorm)"
    n_seeds = len({x["seed"] for x in rows})
    return (
        f"SMES balance sweep: {r.get('data', '?')}, small VGG{bn}, {r.get('epochs', '?')} epochs, "
        f"{n_seeds} seed(s)"
    )


def read_csv(path: str) -> list[dict]:
    """Rows written by :func:`write_csv`, numbers parsed back."""

    def num(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as f:
        return [{k: num(v) for k, v in r.items()} for r in csv.DictReader(f)]
