"""Balance sweep: the SMES paper's experiment, reproduced in miniature.

Trains a small VGG-style CNN with :class:`smes_fused.SMES` over a grid of balance coefficients
``p`` (the exponent of the second moment in the denominator) and several seeds, and records for
every run the fit (train loss/accuracy), the generalisation (test accuracy, gap) and, per weight
layer from input to output, the mean ratio ``||Δθ|| / ||θ||`` of one optimizer step to the weight
it updates. That per-layer profile is the mechanism the balance theory invokes (p > 0 moves
training towards the output layers, p < 0 towards the input layers); the paper never measures it.

Run ``python -m smes_fused.sweep`` (about 4 minutes on 2 CPU cores) or ``--quick`` (seconds).

Data (nothing is downloaded)
    ``--data digits`` (default): scikit-learn's bundled 8x8 digits, 1797 images, 10 classes. A
    fixed stratified split: 360 test images, 20 % of the rest for validation, the rest to train.
    ``--data cifar10:DIR`` / ``--data cifar100:DIR``: a local copy of the CIFAR python-pickle
    release (``data_batch_1..5`` + ``test_batch``, or ``train`` + ``test``; DIR may also be the
    folder that contains ``cifar-10-batches-py`` / ``cifar-100-python``). 5000 training images
    are held out for validation. No augmentation. These files are unpickled: only point this at
    data you trust.

Model
    VGG-style: two conv-conv-pool blocks (16, 32 channels; 3x3 convs, BatchNorm, ReLU) and a
    two-layer classifier (64 hidden) on digits = 6 weight layers; three blocks (32, 64, 128) and
    256 hidden on CIFAR = 8 weight layers. ``--no-batchnorm`` drops BatchNorm (plain VGG).

Protocol (the paper's, scaled down)
    The paper: batch 128, lr 0.1, L2 weight decay 5e-4, 200 epochs, p from -0.3 to 0.1. Here:
    batch 64 (digits has 1.1k training images), 15 epochs, SMES with betas (0.9, 0.999),
    eps 1e-8, bias correction, L2 weight decay 5e-4 (``decoupled_weight_decay=False``, on every
    parameter), one epoch of linear warm-up then cosine decay to 0, stepped per batch.

Learning rate per exponent
    One lr cannot serve every p: with gradient entries of typical size s the SMES step scales
    like lr * s^(1-2p), so p = 0 needs an SGD-scale lr and p = 0.5 an Adam-scale one, and p < 0
    needs larger still. The grid is therefore centred on a log-linear interpolation through two
    anchors, lr_c(p) = lr0 * (lr_half / lr0)^(2p), with lr0 = 0.3 at p = 0 (SMES's momentum is an
    EMA, so this is torch SGD lr 0.03 with momentum 0.9) and lr_half = 3e-3 at p = 0.5 (Adam);
    it equalises the step for gradient entries of size lr_half / lr0 = 1e-2 and extrapolates to
    p < 0 (lr_c(-0.3) = 4.75). Since that size is only a guess, every p is also trained at
    lr_c(p) * {1/4, 1/2, 1, 2, 4} (``--lr-mults``) and the lr with the best mean *validation*
    accuracy over seeds is kept; the test set plays no part in the choice. Every run of the grid
    is in ``<tag>_runs.csv``; the selected ones in ``<tag>.csv``.

Outputs (in ``--out``, default ``runs/sweep/``, which git ignores; file names start with ``--tag``,
default ``sweep``)
    ``sweep.csv``          one row per (p, seed) at the selected lr: metrics + ratio_<layer>
    ``sweep_runs.csv``     every run of the lr grid (same columns)
    ``sweep_epochs.csv``   per epoch of every run: running train loss/acc, val acc, ratios
    ``sweep_accuracy.png`` train/test accuracy and generalisation gap against p (mean ± std)
    ``sweep_layers.png``   per-layer update/weight ratio, input -> output, one line per p
    and a mean ± std table per p on the console.

Metrics: train loss/accuracy are measured after training, in eval mode, on the whole training
split; ``gap_acc`` = train acc - test acc and ``gap_loss`` = test loss - train loss. A layer's
ratio is ``||W_{t+1} - W_t|| / ||W_t||`` over its weight tensor (bias and BatchNorm excluded),
averaged over every step of training (the L2 decay is part of the step). ``out_in`` is the
output layer's ratio divided by the input layer's.
"""

from .cli import build_parser, main, replot
from .data import (
    DataError,
    Dataset,
    load_cifar,
    load_data,
    load_digits_dataset,
    subset,
)
from .model import SmallVGG, build_model
from .output import (
    aggregate,
    plot_accuracy,
    plot_layers,
    plot_title,
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
    lr_factor,
    select_lr,
    train_run,
)

__all__ = [
    "DEFAULT_EXPONENTS",
    "DEFAULT_LR_MULTS",
    "Config",
    "DataError",
    "Dataset",
    "SmallVGG",
    "UpdateRatioTracker",
    "aggregate",
    "build_model",
    "build_parser",
    "centre_lr",
    "evaluate",
    "load_cifar",
    "load_data",
    "load_digits_dataset",
    "lr_factor",
    "main",
    "plot_accuracy",
    "plot_layers",
    "plot_title",
    "ratio_columns",
    "read_csv",
    "replot",
    "run_grid",
    "select_lr",
    "subset",
    "summary_table",
    "train_run",
    "write_csv",
]
