"""Classification heads by name. Each returns `(logits, loss_logits)`:

- `logits`: what prediction and top-k accuracy use (no margin);
- `loss_logits`: what cross-entropy is computed on (with ArcFace's margin on the target class).

Both come from one matrix product per step. Heads always run in fp32 (the angle arithmetic of
ArcFace loses too much in bf16).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from src.config import ModelConfig


class LinearHead(nn.Module):
    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.fc(embeddings.float())
        return logits, logits


class ArcFaceHead(nn.Module):
    """Additive angular margin (Deng et al., CVPR 2019), numerically the same as
    pytorch-metric-learning's `ArcFaceLoss` (tests/models/test_models.py checks this), including its
    fallback that keeps the target logit monotonic past pi - m.

    Written here rather than wrapping `ArcFaceLoss` because that class selects the target cosines
    with a boolean mask (`cosine[mask == 1]`), which forces a GPU->host synchronisation every
    step, and it cannot return the margin-free logits without a second matrix product.
    """

    def __init__(self, embedding_dim: int, num_classes: int, margin: float, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_normal_(self.weight)
        self.margin, self.scale = margin, scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None):
        cosine = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(self.weight, dim=1))
        logits = cosine * self.scale
        if labels is None:
            return logits, logits
        target = cosine.gather(1, labels[:, None])
        angle = torch.acos(target.clamp(-1.0, 1.0))
        with_margin = torch.where(angle <= math.pi - self.margin, torch.cos(angle + self.margin),
                                  target - self.margin * math.sin(self.margin))
        loss_logits = logits.scatter(1, labels[:, None], with_margin * self.scale)
        return logits, loss_logits


# model.head -> a builder from (the model's config, the number of individuals); the config's Literal
# of head names must list exactly these (tests/test_config.py checks it).
HEADS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "linear": lambda config, classes: LinearHead(config.embedding_dim, classes),
    "arcface": lambda config, classes: ArcFaceHead(config.embedding_dim, classes, config.arcface_margin,
                                                   config.arcface_scale),
}
