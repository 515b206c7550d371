"""The linear probe: a logistic-regression head fitted on the fully frozen backbone's pooled
features of centre crops, by L-BFGS, in seconds.

It is the floor of a search (the export is never worse than it) and the start of every trial's
head (LP-FT, Kumar et al. ICLR 2022: fine-tuning from a fitted head distorts the pretrained
features less than fine-tuning from a random one, and its first epoch is already informative).
Two choices are made on val like any other hyperparameter, by the lowest val NLL (accuracy on a few
hundred images has few levels and often ties): the L2 strength, and whether the features are
standardised first (per feature, by the training images' mean and spread). Standardising lets every
feature count alike; raw features keep the backbone's own scale, where small features are noise.
A standardised fit is folded back into raw weights, so the head loads into the network as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# L2 strengths tried (mean cross-entropy + l2 * |W|^2): from nearly none to strong shrinkage.
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class Probe:
    weight: torch.Tensor  # (classes, features): loads into the model's head as it is
    bias: torch.Tensor  # (classes,)
    l2: float
    standardized: bool  # fitted on standardised features (weight and bias are folded back to raw ones)
    val_acc: float
    val_loss: float

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.clone(), "bias": self.bias.clone()}


def fit_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, steps: int = 200) -> nn.Linear:
    """Full-batch multinomial logistic regression, deterministic (starts from zeros)."""
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, tolerance_grad=1e-7,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


@torch.no_grad()
def score(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = head(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and spread of the training features (a constant feature gets spread 1)."""
    spread = x.std(0)
    return x.mean(0), torch.where(spread > 1e-6, spread, torch.ones_like(spread))


def folded(head: nn.Linear, mean: torch.Tensor, spread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (x - mean) / spread + b as raw-feature weights: W / spread, b - (W / spread) mean."""
    weight = head.weight.detach() / spread
    return weight.clone(), (head.bias.detach() - weight @ mean).clone()


def fit_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int,
    l2_grid: tuple[float, ...] = L2_GRID,
) -> Probe:
    train_x, val_x = train_x.float(), val_x.float()
    mean, spread = standardizer(train_x)
    best: Probe | None = None
    for standardized in (False, True):
        tx, vx = ((train_x - mean) / spread, (val_x - mean) / spread) if standardized else (train_x, val_x)
        for l2 in l2_grid:
            head = fit_head(tx, train_y, num_classes, l2)
            loss, acc = score(head, vx, val_y)
            if not math.isfinite(loss):
                continue
            if best is None or loss < best.val_loss:
                weight, bias = folded(head, mean, spread) if standardized else \
                    (head.weight.detach().clone(), head.bias.detach().clone())
                best = Probe(weight, bias, l2, standardized, acc, loss)
    if best is None:
        raise ValueError("the linear probe diverged for every L2 strength")
    return best
