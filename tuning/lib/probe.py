"""The linear probe: a logistic-regression head fitted on the fully frozen backbone's pooled
features of centre crops, by L-BFGS, in seconds.

It is the floor of a search (the export is never worse than it) and the start of every trial's
head (LP-FT, Kumar et al. ICLR 2022: fine-tuning from a fitted head distorts the pretrained
features less than fine-tuning from a random one, and its first epoch is already informative).
The L2 strength is chosen on val like any other hyperparameter: highest val_acc, then lowest val_loss.
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


def fit_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int,
    l2_grid: tuple[float, ...] = L2_GRID,
) -> Probe:
    best: Probe | None = None
    for l2 in l2_grid:
        head = fit_head(train_x, train_y, num_classes, l2)
        loss, acc = score(head, val_x, val_y)
        if not math.isfinite(loss):
            continue
        if best is None or (acc, -loss) > (best.val_acc, -best.val_loss):
            best = Probe(head.weight.detach().clone(), head.bias.detach().clone(), l2, acc, loss)
    if best is None:
        raise ValueError("the linear probe diverged for every L2 strength")
    return best
