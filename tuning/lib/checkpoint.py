"""The checkpoint format and evaluation, shared by the trainable that writes checkpoints and the
export that reads the best one: what a trial saves, how it is loaded, and how a split is scored."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from tuning.lib.model import FineTuneNet

CHECKPOINT_FILE = "state.pt"
# Validation logits at the report the checkpoint belongs to (a few KB): what the final model is
# chosen and combined from after the search (tuning.app.final_model), without loading a network.
VAL_LOGITS_FILE = "val_logits.npy"


def save_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               schedule: Any, epoch: int, steps: int = 0, val_logits: torch.Tensor | None = None) -> None:
    """`epoch` is the number of epochs done and `steps` the optimizer steps done in the next (a
    report at an ASHA rung inside an epoch): a restarted trial continues from there."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "epoch": epoch, "steps": steps}, Path(folder) / CHECKPOINT_FILE)
    if val_logits is not None:
        np.save(Path(folder) / VAL_LOGITS_FILE, val_logits.numpy().astype(np.float32))


def load_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def forward_batch_size(device: torch.device) -> int:
    """Images per forward pass without gradients (validation, filling the cache). On CPU small
    batches are faster (cache locality; benchmarks/README.md, throughput); a GPU wants large ones."""
    return 256 if device.type == "cuda" else 16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on CUDA (no loss scaling needed, unlike fp16); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Feed:
    """One split as the trainable part of the network sees it: `batch(indices)` is the frozen
    prefix's output for those images (the normalised images themselves at depth 0)."""

    labels: torch.Tensor
    batch: Callable[[Sequence[int]], torch.Tensor]
    cached: bool

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def predict_logits(model: FineTuneNet, feed: Feed, batch_size: int | None = None) -> torch.Tensor:
    """(N, classes) float32 logits over a split's eval crops, on the CPU."""
    model.eval()
    device = feed.labels.device
    batch_size = batch_size or forward_batch_size(device)
    out = []
    for i in range(0, len(feed), batch_size):
        idx = list(range(i, min(len(feed), i + batch_size)))
        with autocast(device):
            out.append(model.trainable_forward(feed.batch(idx).to(device)).float().cpu())
    return torch.cat(out)


def evaluate_logits(model: FineTuneNet, feed: Feed, batch_size: int | None = None) -> tuple[float, float, torch.Tensor]:
    """Mean cross-entropy, accuracy and the logits over a split's eval crops."""
    logits = predict_logits(model, feed, batch_size)
    target = feed.labels.cpu()
    loss = nn.functional.cross_entropy(logits, target).item()
    return loss, (logits.argmax(1) == target).float().mean().item(), logits


def evaluate(model: FineTuneNet, feed: Feed, batch_size: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split's eval crops."""
    return evaluate_logits(model, feed, batch_size)[:2]
