"""SMES in PyTorch Lightning, with bf16 mixed precision and gradient clipping.

    python examples/lightning.py

``configure_optimizers`` returns SMES like any torch optimizer. One thing to know: by default
SMES unscales AMP gradients inside ``step()`` (``_step_supports_amp_scaling = True``, as
``AdamW(fused=True)``), so Lightning cannot clip them first and refuses ``gradient_clip_val``
under ``precision="16-mixed"``/``"bf16-mixed"``: "The current optimizer, SMES, does not allow
for gradient clipping because it performs unscaling of gradients internally". Construct it with
``amp_unscale="scaler"`` and the scaler (Lightning's) unscales before clipping, as for foreach
AdamW; the step is the same.
"""

import tempfile
import warnings

import pytorch_lightning as pl
import torch

import smes_fused
from smes_fused import SMES

EXPONENT = 0.25
STEPS = 10


class Regression(pl.LightningModule):
    def __init__(self, amp_unscale="scaler"):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)
        )
        self.amp_unscale = amp_unscale
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return SMES(
            self.parameters(),
            exponent=EXPONENT,
            lr=smes_fused.lr_for_exponent(EXPONENT),
            amp_unscale=self.amp_unscale,  # "scaler": Lightning unscales, then clips
        )


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]  # a target the net can fit
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


def fit(model):
    """A short bf16-mixed run with gradient clipping; returns the losses (one per step)."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    with tempfile.TemporaryDirectory(prefix="smes_pl_") as root:  # nothing left behind
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            precision="bf16-mixed",
            gradient_clip_val=1.0,
            max_steps=STEPS,
            default_root_dir=root,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, data())
    return model.losses


def main(amp_unscale="scaler"):
    torch.manual_seed(0)
    losses = fit(Regression(amp_unscale))
    print(
        f"SMES(exponent={EXPONENT}, amp_unscale={amp_unscale!r}), bf16-mixed, clip 1.0: "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
    )
    return losses


if __name__ == "__main__":
    main()
