"""SMES in the Hugging Face Trainer, two ways.

    python examples/hf_trainer.py

1. ``optimizers=(SMES(...), None)``: you build the optimizer; the Trainer adds its scheduler.
2. ``optimizer_cls_and_kwargs=(SMES, {...})``: the Trainer builds it, with its usual two
   param groups (biases and LayerNorm weights without weight decay). Their weight_decay comes
   from ``TrainingArguments.weight_decay``, not from the kwargs.

A 1-layer GPT-2 built from a config (nothing is downloaded) learns a fixed random sequence on CPU.
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import smes_fused
from smes_fused import SMES

EXPONENT = 0.25
LR = smes_fused.lr_for_exponent(EXPONENT, adamw_lr=3e-3)
STEPS = 5


class RandomTokens(torch.utils.data.Dataset):
    """The same 16 random sequences over and over: a loss that must go down."""

    def __init__(self, n=16, length=16, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def train(how="optimizers"):
    """One short Trainer run; returns (the SMES instance, the logged training losses)."""
    model = tiny_gpt2()
    with tempfile.TemporaryDirectory(prefix="smes_hf_") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=STEPS,
            per_device_train_batch_size=8,
            learning_rate=LR,  # the Trainer's scheduler starts from the groups' lr
            lr_scheduler_type="constant",
            weight_decay=0.01,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        if how == "optimizers":
            opt = SMES(model.parameters(), lr=LR, exponent=EXPONENT, weight_decay=0.01)
            trainer = Trainer(
                model=model, args=args, train_dataset=RandomTokens(), optimizers=(opt, None)
            )
        elif how == "optimizer_cls_and_kwargs":
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=RandomTokens(),
                optimizer_cls_and_kwargs=(SMES, {"lr": LR, "exponent": EXPONENT}),
            )
        else:
            raise ValueError(how)
        trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return opt, losses


def main():
    for how in ("optimizers", "optimizer_cls_and_kwargs"):
        opt, losses = train(how)
        print(
            f"{how}: {type(opt).__name__}(exponent={EXPONENT}), "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
        )


if __name__ == "__main__":
    main()
