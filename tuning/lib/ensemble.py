"""The exported network: one or more fine-tuned members, each with its temperature, whose
probabilities are averaged with weights (a single trial or a soup is an ensemble of one).

Every member starts from the same pretrained backbone, and a member frozen to depth k keeps its
first k stages exactly as pretrained: the pretrained prefix is computed once, stage by stage, and
each member continues from its own depth, so members that share a frozen prefix share its work.
With `mirror`, each member's logits are averaged over the image and its left-right mirror before
its temperature (test-time augmentation for a model trained on flipped views as well).
`forward` returns log-probabilities, so `model(x).softmax(1)` gives the probabilities and
cross-entropy on its output is the NLL, as for a single network's logits."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tuning.lib.model import FineTuneNet


class Ensemble(nn.Module):
    def __init__(self, members: Sequence[FineTuneNet], weights: Sequence[float], temperatures: Sequence[float],
                 mirror: bool = False) -> None:
        super().__init__()
        if not members or not len(members) == len(weights) == len(temperatures):
            raise ValueError("an ensemble needs one weight and one temperature per member, and a member")
        self.members = nn.ModuleList(members)
        w = torch.tensor([float(x) for x in weights])
        self.register_buffer("log_weights", (w / w.sum()).log())
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]))
        # members in the order of their depth; the deepest one's frozen stages are the pretrained prefix
        self.order = sorted(range(len(members)), key=lambda i: members[i].freeze_depth)
        self.mirror = mirror

    @property
    def prefix(self) -> FineTuneNet:
        return self.members[self.order[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix = self.prefix
        n = x.shape[0]
        if self.mirror:
            x = torch.cat([x, x.flip(-1)])
        if prefix.in_repeat > 1:
            x = x.expand(-1, prefix.in_repeat, -1, -1)
        h, depth = prefix._layout(x), 0
        out: list[torch.Tensor | None] = [None] * len(self.members)
        for i in self.order:
            member = self.members[i]
            with torch.no_grad():
                while depth < member.freeze_depth:
                    h = prefix.stages[depth](h)
                    depth += 1
            features = member.pool(h) if member.fully_frozen else h
            logits = member.trainable_forward(features).float()
            if self.mirror:
                logits = (logits[:n] + logits[n:]) / 2
            out[i] = torch.log_softmax(logits / self.temperatures[i], dim=1) + self.log_weights[i]
        return torch.logsumexp(torch.stack(out), dim=0)  # type: ignore[arg-type]
