"""CSV files, the console tables (summary, paired comparison) and the plots of a sweep."""

from __future__ import annotations

import csv
import math
import os

import numpy as np


def write_csv(path: str, rows: list[dict]) -> bool:
    """Whether it wrote ``path``; with no rows it removes one an earlier run left there (a
    stale file would read as this run's)."""
    if not rows:
        if os.path.isfile(path):
            os.remove(path)
        return False
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return True


def ratio_columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k.startswith("ratio_")]


def aggregate(rows: list[dict], key: str) -> dict[float, tuple[float, float]]:
    """Per p: (mean, std) of ``key`` over seeds (population std; 0 for one seed)."""
    out = {}
    for p in sorted({r["p"] for r in rows}):
        v = np.array([r[key] for r in rows if r["p"] == p], dtype=np.float64)
        out[p] = (float(np.mean(v)), float(np.std(v)))
    return out


def is_wilson(rows: list[dict]) -> bool:
    return bool(rows) and rows[0].get("data") == "wilson"


_IMAGE_COLUMNS = [
    ("train_loss", "train loss", 1.0, ".3f"),
    ("train_acc", "train acc %", 100.0, ".1f"),
    ("test_acc", "test acc %", 100.0, ".2f"),
    ("gap_acc", "gap acc %", 100.0, ".2f"),
    ("gap_loss", "gap loss", 1.0, ".3f"),
    ("out_in", "out/in ratio", 1.0, ".2f"),
]
_WILSON_COLUMNS = [
    ("train_loss", "train loss", 1.0, ".1e"),
    ("train_acc", "train acc %", 100.0, ".1f"),
    ("test_err", "test err %", 100.0, ".1f"),
    ("weight_norm", "‖w‖", 1.0, ".3f"),
    ("w_label", "w_label", 1.0, ".3f"),
    ("w_const", "w_const", 1.0, ".3f"),
    ("margin", "margin", 1.0, ".3f"),
]


def _format_table(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    fmt_line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True))  # noqa: E731
    return [fmt_line(head), fmt_line(["-" * w for w in widths])] + [fmt_line(b) for b in body]


def summary_table(rows: list[dict], lr_grid: list[dict] | None = None) -> str:
    """Mean ± std over seeds per p. Wilson's data: test error and the solution's weights."""
    cols = _WILSON_COLUMNS if is_wilson(rows) else _IMAGE_COLUMNS
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
    lines = _format_table(head, body)
    what = "data draws" if is_wilson(rows) else "seed(s)"
    lines.append(
        f"mean ± std over {n_seeds} {what}; lr selected per p on the validation split"
        + (" (* = edge of the lr grid)" if any("*" in b[1] for b in body) else "")
    )
    if is_wilson(rows):
        lines.append(
            "w_label, w_const: weights of column 0 and the sum over columns 1-2, which alone "
            "decide a new example's output y·w_label + w_const; margin = (w_label − |w_const|)/‖w‖"
            " > 0 iff every new example is classified right"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- paired comparison

PAIRED_REFS = (0.0, 0.5)


def paired_metric(rows: list[dict]) -> tuple[str, str]:
    """(column, label) the paired comparison is made on: test error for Wilson's data, test
    accuracy otherwise."""
    return ("test_err", "test err") if is_wilson(rows) else ("test_acc", "test acc")


def paired(rows: list[dict], key: str, ref: float) -> dict[float, dict]:
    """Per p (other than ``ref``): ``key``(p) − ``key``(ref), paired by seed.

    Each seed's run at p is compared with the same seed's run at ``ref`` (same initialisation
    and batch order, or for Wilson's data the same draw), which removes what the seed alone
    does. Returns per p: n (seeds present at both), mean and std (n − 1 denominator) of the
    differences, the paired t statistic, its two-sided p-value (n − 1 degrees of freedom; 1 when
    every difference is 0, 0 when all are equal and non-zero, NaN for one seed), and how many
    seeds came out higher / lower.
    """
    from scipy import stats

    by = {(r["p"], r["seed"]): float(r[key]) for r in rows}
    ref_seeds = {s for (p, s) in by if p == ref}
    out = {}
    for p in sorted({r["p"] for r in rows}):
        if p == ref or not ref_seeds:
            continue
        seeds = sorted(s for (q, s) in by if q == p and s in ref_seeds)
        d = np.array([by[(p, s)] - by[(ref, s)] for s in seeds], dtype=np.float64)
        n = len(d)
        if n == 0:
            continue
        mean = float(d.mean())
        sd = float(d.std(ddof=1)) if n > 1 else math.nan
        if n < 2:
            t = pval = math.nan
        elif sd == 0.0:
            t, pval = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
        else:
            t = mean / (sd / math.sqrt(n))
            pval = float(2.0 * stats.t.sf(abs(t), n - 1))
        out[p] = {
            "n": n,
            "mean": mean,
            "std": sd,
            "t": t,
            "p_value": pval,
            "higher": int((d > 0).sum()),
            "lower": int((d < 0).sum()),
        }
    return out


def paired_rows(rows: list[dict], refs: tuple[float, ...] = PAIRED_REFS) -> list[dict]:
    """The paired comparisons against each reference p present, as CSV rows."""
    key, _ = paired_metric(rows)
    out = []
    for ref in refs:
        for p, c in paired(rows, key, ref).items():
            out.append({"p": p, "ref_p": ref, "metric": key, **c})
    return out


def paired_table(rows: list[dict], refs: tuple[float, ...] = PAIRED_REFS) -> str:
    """Per p: Δ metric (percentage points) against each reference p, mean ± std over seeds,
    with the paired t-test's p-value and the count of seeds higher/lower."""
    key, label = paired_metric(rows)
    refs = tuple(r for r in refs if any(x["p"] == r for x in rows))
    if not refs:
        return f"(no paired comparison: none of p = {PAIRED_REFS} in the grid)"
    comps = {ref: paired(rows, key, ref) for ref in refs}
    head = ["p"]
    for ref in refs:
        head += [f"Δ {label} vs p={ref:g} (pp)", "t-test p", "+/−"]
    body = []
    for p in sorted({r["p"] for r in rows}):
        line = [f"{p:g}"]
        for ref in refs:
            c = comps[ref].get(p)
            if c is None:
                line += ["—", "", ""]
                continue
            sd = "" if math.isnan(c["std"]) else f" ± {100 * c['std']:.2f}"
            pv = "" if math.isnan(c["p_value"]) else f"{c['p_value']:.3f}"
            mean = round(100 * c["mean"], 2) + 0.0  # no "-0.00"
            line += [f"{mean:+.2f}{sd}", pv, f"{c['higher']}/{c['lower']}"]
        body.append(line)
    lines = _format_table(head, body)
    n = max((c["n"] for comp in comps.values() for c in comp.values()), default=0)
    lines.append(
        f"paired by seed over {n} seed(s): mean ± std of the per-seed difference; t-test p: "
        "two-sided paired t-test (below 0.05: larger than seed noise); +/−: seeds higher/lower"
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
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.4))
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
    _paired_panel(ax3, rows)
    for ax in (ax1, ax2, ax3):
        ax.axvline(0.0, color="grey", lw=0.7, ls=":")
        ax.axvline(0.5, color="grey", lw=0.7, ls=":")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _paired_panel(ax, rows: list[dict]) -> None:
    """Δ metric against p = 0 and p = 0.5, paired by seed: mean and 95 % t-interval."""
    from scipy import stats

    key, label = paired_metric(rows)
    for i, ref in enumerate(PAIRED_REFS):
        comp = paired(rows, key, ref)
        if not comp:
            continue
        ps = sorted(comp)
        mean = np.array([100 * comp[p]["mean"] for p in ps])
        n = np.array([comp[p]["n"] for p in ps])
        sd = np.array([100 * comp[p]["std"] for p in ps])
        half = np.where(n > 1, sd / np.sqrt(n) * stats.t.ppf(0.975, np.maximum(n - 1, 1)), 0.0)
        shift = (i - 0.5) * 0.006 * (max(ps + [ref]) - min(ps + [ref]))  # keep the bars apart
        ax.errorbar(
            np.array(ps) + shift,
            mean,
            yerr=np.nan_to_num(half),
            marker="o^"[i],
            capsize=3,
            color=("C0", "C1")[i],
            label=f"vs p = {ref:g}",
        )
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("balance coefficient p")
    ax.set_ylabel(f"Δ {label} (percentage points)")
    ax.set_title("paired by seed: mean, 95 % t-interval")
    ax.legend()


def plot_wilson(rows: list[dict], path: str, title: str) -> None:
    """Wilson's data: test error, the solution's weights, and the paired comparison, against p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = sorted({r["p"] for r in rows})
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.4))
    a = aggregate(rows, "test_err")
    ax1.errorbar(
        ps,
        [100 * a[p][0] for p in ps],
        yerr=[100 * a[p][1] for p in ps],
        marker="o",
        capsize=4,
        label="test error",
    )
    tr = aggregate(rows, "train_acc")
    ax1.plot(ps, [100 * (1 - tr[p][0]) for p in ps], marker="s", label="training error")
    neg = aggregate(rows, "test_neg") if "test_neg" in rows[0] else None
    if neg:
        ax1.plot(
            ps,
            [100 * neg[p][0] for p in ps],
            color="grey",
            ls="--",
            label="negatives among test examples",
        )
    ax1.set_ylabel("error (%)")
    ax1.set_title("error vs p (mean ± std over draws)")
    ax1.legend()
    for key, label, marker in (
        ("weight_norm", "‖w‖", "o"),
        ("w_label", "w_label (column 0)", "s"),
        ("w_const", "w_const (columns 1-2)", "^"),
        ("margin", "margin on new examples / ‖w‖", "D"),
    ):
        a = aggregate(rows, key)
        ax2.errorbar(
            ps,
            [a[p][0] for p in ps],
            yerr=[a[p][1] for p in ps],
            marker=marker,
            capsize=3,
            label=label,
        )
    ax2.axhline(0.0, color="black", lw=0.8)
    ax2.set_title("the solution found")
    ax2.legend(fontsize=8)
    _paired_panel(ax3, rows)
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("balance coefficient p")
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
    ax1.set_title("per-" + ("group" if is_wilson(rows) else "layer") + " update/weight ratio")
    ax2.set_yscale("log")
    ax2.set_ylabel("ratio / its geometric mean over layers")
    ax2.set_title("profile shape (lr-independent)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names)
        ax.set_xlabel("feature group" if is_wilson(rows) else "layer (input → output)")
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_title(rows: list[dict]) -> str:
    r = rows[0]
    n_seeds = len({x["seed"] for x in rows})
    if is_wilson(rows):
        return (
            f"SMES balance sweep: Wilson et al.'s construction, {r.get('n_train', '?')} training "
            f"examples, least squares from w = 0, {r.get('epochs', '?')} full-batch steps, "
            f"{n_seeds} draw(s)"
        )
    bn = "" if r.get("batchnorm", 1) else " (no BatchNorm)"
    model = {"vgg": "small VGG", "mlp": "MLP"}.get(r.get("model", "vgg"), r.get("model"))
    n_train = f", {r['n_train']} train images" if "n_train" in r else ""
    return (
        f"SMES balance sweep: {r.get('data', '?')}{n_train}, {model}{bn}, "
        f"{r.get('epochs', '?')} epochs, {n_seeds} seed(s)"
    )


def plot_all(rows: list[dict], stem: str) -> list[str]:
    """The sweep's two figures, ``<stem>_accuracy.png`` and ``<stem>_layers.png``."""
    title = plot_title(rows)
    (plot_wilson if is_wilson(rows) else plot_accuracy)(rows, stem + "_accuracy.png", title)
    plot_layers(rows, stem + "_layers.png", title)
    return [stem + "_accuracy.png", stem + "_layers.png"]


# The columns of a sweep row (training.train_one's summary) that the tables and figures read,
# besides their kind's (_IMAGE_COLUMNS or _WILSON_COLUMNS, by the "data" column) and the per-layer
# "ratio_" ones.
_ROW_COLUMNS = ("p", "lr", "seed")


def csv_problem(rows: list[dict], path: str) -> str | None:
    """What makes ``rows`` (read from ``path`` by :func:`read_csv`) unusable for the sweep's
    tables and figures, or None."""
    if not rows:
        return f"{path} has no rows"
    cols = _WILSON_COLUMNS if is_wilson(rows) else _IMAGE_COLUMNS
    missing = [c for c in (*_ROW_COLUMNS, *(c[0] for c in cols)) if c not in rows[0]]
    if not any(k.startswith("ratio_") for k in rows[0]):
        missing.append("ratio_<layer>")
    if missing:
        return f"{path} is not a sweep's results CSV (no column {', '.join(missing)})"
    for i, r in enumerate(rows):
        bad = [k for k in ("p", "lr", "seed") if not isinstance(r[k], (int, float))]
        if bad:
            return f"{path}, row {i + 2}: {', '.join(bad)} not a number"
    return None


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
