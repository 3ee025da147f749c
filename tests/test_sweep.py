"""The balance sweep (issue 3): smoke test of --quick, the per-layer ratio, the data loaders."""

from __future__ import annotations

import csv
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from smes_fused import SMES, sweep  # noqa: E402

RATIO_COLS = [f"ratio_{n}" for n in ("conv1", "conv2", "conv3", "conv4", "fc1", "fc2")]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- per-layer ratio


def test_update_ratio_toy_case():
    w1 = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    w2 = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # norm 1
    tr = sweep.UpdateRatioTracker([w1, w2])

    tr.before_step()
    with torch.no_grad():
        w1.add_(torch.tensor([0.3, 0.4]))  # |Δ| = 0.5 -> 0.1
        w2.add_(torch.tensor([[0.0, 0.0], [0.0, 0.2]]))  # |Δ| = 0.2 -> 0.2
    r = tr.after_step()
    assert r.tolist() == pytest.approx([0.1, 0.2])

    tr.before_step()  # second step: w1 = [3.3, 4.4] (norm 5.5), Δ = 0.55 -> 0.1; w2 unchanged
    with torch.no_grad():
        w1.mul_(1.1)
    tr.after_step()
    assert tr.mean() == pytest.approx([0.1, 0.1])
    tr.reset()
    assert all(math.isnan(v) for v in tr.mean())  # the epoch mean restarts ...
    assert tr.mean(total=True) == pytest.approx([0.1, 0.1])  # ... the run mean does not


def test_update_ratio_of_a_real_smes_step():
    """p = 0 without bias correction is SGD: Δ = lr (1 - β1) g exactly, so the ratio is known."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    opt = SMES(lin.parameters(), lr=0.3, betas=(0.9, 0.999), weight_decay=0.0, exponent=0.0,
               bias_correction=False)  # fmt: skip
    lin(torch.randn(7, 5)).pow(2).sum().backward()
    w0, g = lin.weight.detach().clone(), lin.weight.grad.clone()
    tr = sweep.UpdateRatioTracker([lin.weight])
    tr.before_step()
    opt.step()
    (r,) = tr.after_step().tolist()
    assert r == pytest.approx(float(0.3 * 0.1 * g.norm() / w0.norm()), rel=1e-5)


def test_weight_layers_are_ordered_input_to_output():
    data = sweep.load_digits_dataset()
    model = sweep.build_model(data)
    names = [n for n, _ in model.weight_layers()]
    assert names == [c[len("ratio_") :] for c in RATIO_COLS]
    ws = [w for _, w in model.weight_layers()]
    assert ws[0].shape[1] == 1 and ws[-1].shape[0] == 10  # input channels, classes
    assert model(data.x_test[:4]).shape == (4, 10)


# ------------------------------------------------------------------------------ protocol bits


def test_centre_lr_interpolates_in_log_space():
    assert sweep.centre_lr(0.0, 0.5, 2e-3) == pytest.approx(0.5)
    assert sweep.centre_lr(0.5, 0.5, 2e-3) == pytest.approx(2e-3)
    assert sweep.centre_lr(0.25, 0.5, 2e-3) == pytest.approx(math.sqrt(0.5 * 2e-3))
    assert sweep.centre_lr(-0.3, 0.5, 2e-3) > 0.5  # p < 0 extrapolates above the SGD scale


def test_schedule():
    total, warm = 100, 10
    f = [sweep.lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] < 1e-2
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    g = [sweep.lr_factor(s, total, 0, "step") for s in range(total)]
    assert g[0] == 1.0 and g[-1] == pytest.approx(0.2**3)


def test_select_lr_uses_validation_not_test():
    rows = []
    for lr, val, test in ((0.1, 0.9, 0.99), (0.2, 0.95, 0.5)):
        for seed in (0, 1):
            rows.append(dict(p=0.0, lr=lr, seed=seed, val_acc=val, val_loss=0.1, test_acc=test))
    assert sweep.select_lr(rows) == {0.0: 0.2}


# ------------------------------------------------------------------------------ smoke: --quick


def test_quick_sweep_writes_csv_and_plots(tmp_path, capsys):
    assert sweep.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = _read_csv(tmp_path / "sweep.csv")
    assert len(rows) == 2  # 2 exponents x 1 seed
    assert sorted(float(r["p"]) for r in rows) == [0.0, 0.5]
    need = ["p", "lr", "seed", "train_loss", "train_acc", "test_acc", "gap_acc", "gap_loss"]
    assert set(need + RATIO_COLS) <= set(rows[0])
    for r in rows:
        for c in ["train_loss", "train_acc", "test_acc", *RATIO_COLS]:
            assert math.isfinite(float(r[c])), (c, r[c])
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        assert all(float(r[c]) > 0 for c in RATIO_COLS)
    assert len(_read_csv(tmp_path / "sweep_runs.csv")) == 2
    assert len(_read_csv(tmp_path / "sweep_epochs.csv")) == 2  # 1 epoch per run
    for name in ("sweep_accuracy.png", "sweep_layers.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "test acc" in out and "0.5" in out

    os.remove(tmp_path / "sweep_layers.png")  # --replot redraws from the CSV, training nothing
    assert sweep.main(["--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sweep_layers.png").stat().st_size > 0
    assert "test acc" in capsys.readouterr().out
    assert sweep.main(["--replot", "--out", str(tmp_path / "empty")]) == 2
    # a CSV that is not the sweep's: a clear error, not a KeyError from the plotting code
    capsys.readouterr()
    for name, text, words in [
        ("blank", "", "has no rows"),
        ("other", "a,b\n1,2\n", "is not a sweep's results CSV (no column p, lr, seed"),
        ("binary", b"\xff\xfe\x00".decode("latin-1"), "is not a CSV file"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.csv").write_text(text, encoding="latin-1")
        assert sweep.main(["--replot", "--out", str(tmp_path / name)]) == 2
        assert words in capsys.readouterr().err
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    (tmp_path / "text").mkdir()
    head = rows[0].split(",")
    bad = rows[1].split(",")
    bad[head.index("seed")] = "x"
    (tmp_path / "text" / "sweep.csv").write_text("\n".join([rows[0], ",".join(bad)]) + "\n")
    assert sweep.main(["--replot", "--out", str(tmp_path / "text")]) == 2
    assert "row 2: seed not a number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--train-size", "0"], "--train-size must be >= 1"),  # took every image
        (["--train-size", "-5"], "--train-size must be >= 1"),  # dropped the last 5
        (["--lr", "-1"], "--lr must be > 0"),  # tracebacks from the training code
        (["--lr-mults", "1,-1"], "--lr-mults must be > 0"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--seeds", "0,0"], "--seeds has repeated values"),  # duplicate rows
        (["--exponents", "nan"], "exponents must be finite"),
        (["--model", "mlp", "--mlp-depth", "0"], "an MLP needs --mlp-depth >= 2"),
        (["--model", "mlp", "--mlp-width", "0"], "--mlp-width >= 1"),
        (["--warmup-epochs", "nan"], "--warmup-epochs must be >= 0"),
        (["--backend", "bogus"], "unknown --backend 'bogus'"),
        (["--batch-size", "-5"], "--batch-size must be >= 0"),  # ran as full batch
        (["--jobs", "0"], "--jobs must be >= 1"),  # ran as 1 job
        (["--tag", "a/b"], "--tag must be a plain name"),  # failed after training
        (["--out", "FILE/sub"], "cannot make the folder"),  # failed after training
    ],
)
def test_bad_settings_are_refused_before_any_run(flags, words, tmp_path, capsys):
    from smes_fused.sweep.cli import main

    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    assert main(["--out", str(tmp_path / "out"), *flags]) == 2
    assert words in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["FILE"]


def test_a_file_with_nothing_to_write_is_removed_not_left_stale(tmp_path):
    """A grid without p = 0 or 0.5 has nothing to pair: an earlier run's _paired.csv was left
    in place (and reported as written)."""
    from smes_fused.sweep.output import write_csv

    path = str(tmp_path / "sweep_paired.csv")
    assert write_csv(path, [{"a": 1}]) and os.path.isfile(path)
    assert not write_csv(path, []) and not os.path.exists(path)


def test_help_runs_as_a_module():
    r = subprocess.run(
        [sys.executable, "-m", "smes_fused.sweep", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "validation" in r.stdout and "5e-4" in r.stdout


# ------------------------------------------------------------------------------- CIFAR loader


def _fake_cifar(folder, kind, n_per_file=6, str_keys=False, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    if kind == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        key, n_classes = "labels", 10
    else:
        files, key, n_classes = ["train", "test"], "fine_labels", 100
    for name in files:
        n = n_per_file * (5 if kind == "cifar100" and name == "train" else 1)
        d = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: [int(x) for x in rng.integers(0, n_classes, n)],
        }
        if not str_keys:
            d = {k.encode(): v for k, v in d.items()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f)
    return folder


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_loader_reads_fake_pickles(tmp_path, kind):
    folder = _fake_cifar(str(tmp_path / "c"), kind)
    data = sweep.load_data(f"{kind}:{folder}")
    assert data.n_classes == (10 if kind == "cifar10" else 100)
    n_all = 30  # 5 x 6 training images either way
    assert len(data.y_train) + len(data.y_val) == n_all and len(data.y_val) == n_all // 5
    assert data.x_train.shape[1:] == (3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    # channel-wise standardised with the training split's statistics
    assert data.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    model = sweep.build_model(data)
    assert len(model.weight_layers()) == 8
    assert model(data.x_test).shape == (6, data.n_classes)


def test_cifar_loader_accepts_archive_parent_and_str_keys(tmp_path):
    _fake_cifar(str(tmp_path / "cifar-10-batches-py"), "cifar10", str_keys=True)
    assert len(sweep.load_data(f"cifar10:{tmp_path}").y_test) == 6


def test_cifar_loader_errors(tmp_path):
    with pytest.raises(sweep.DataError, match="does not exist"):
        sweep.load_data(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(sweep.DataError, match="needs a folder"):
        sweep.load_data("cifar10")
    with pytest.raises(sweep.DataError, match="expected 'digits'"):
        sweep.load_data("mnist:/x")
    folder = _fake_cifar(str(tmp_path / "c"), "cifar10")
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(sweep.DataError, match="lacks data_batch_3"):
        sweep.load_data(f"cifar10:{folder}")
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(sweep.DataError, match="not a CIFAR python-pickle batch"):
        sweep.load_data(f"cifar10:{folder}")
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(sweep.DataError, match="expected \\(N, 3072\\)"):
        sweep.load_data(f"cifar10:{folder}")
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(sweep.DataError, match="labels outside"):
        sweep.load_data(f"cifar10:{folder}")


def test_cli_reports_bad_data_clearly(tmp_path, capsys):
    assert sweep.main(["--quick", "--data", f"cifar100:{tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quick_sweep_on_fake_cifar(tmp_path):
    folder = _fake_cifar(str(tmp_path / "c"), "cifar10", n_per_file=2)
    out = tmp_path / "out"
    args = ["--quick", "--data", f"cifar10:{folder}", "--out", str(out), "--no-progress"]
    assert sweep.main([*args, "--no-plots"]) == 0
    rows = _read_csv(out / "sweep.csv")
    assert len(rows) == 2 and sum(k.startswith("ratio_") for k in rows[0]) == 8


def test_quick_sweep_with_the_spec4_settings(tmp_path, capsys):
    """--projection, --rectify and an exponent schedule reach every run and the table says so."""
    args = ["--quick", "--out", str(tmp_path), "--no-progress", "--no-plots", "--projection",
            "--rectify", "--exponent-schedule", "linear", "--exponent-start", "0.5"]  # fmt: skip
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "projection=True, rectify=True, exponent schedule: linear from p = 0.5" in out
    rows = _read_csv(tmp_path / "sweep_projection_rectify_linear-from-0.5.csv")
    assert sorted(float(r["p"]) for r in rows) == [0.0, 0.5]
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)


def test_spec4_settings_reach_the_optimizer(monkeypatch):
    """The run's optimizer has projection and rectification on, and the linear schedule has
    moved its exponent from 0.5 to the row's p by the end of training."""
    from smes_fused.sweep import training

    made = []

    class Recording(SMES):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(training, "SMES", Recording)
    data = sweep.subset(sweep.load_digits_dataset(), 64)
    cfg = training.Config(epochs=1, batch_size=32, projection=True, rectify=True,
                          exponent_schedule="linear", exponent_start=0.5)  # fmt: skip
    row, _ = training.train_run(data, -0.08, 0.05, 0, cfg)
    assert math.isfinite(float(row["train_loss"]))
    (opt,) = made
    for g in opt.param_groups:
        assert g["projection"] and g["rectify"]
        assert g["exponent"] == pytest.approx(-0.08)
