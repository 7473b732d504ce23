"""`create_model(model_config, num_classes)`: the identification network by name."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.config import ModelConfig
from src.errors import clipped_repr
from src.models.backbones import ModelError, create_backbone
from src.models.heads import HEADS


class IdentificationModel(nn.Module):
    """Backbone -> embedding neck (dropout, linear, batch norm) -> head.

    `forward(images, labels)` returns `(embeddings, logits, loss_logits)` so that one call (the one
    DDP and torch.compile wrap) covers everything the loss depends on.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int, head: nn.Module,
                 dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, embedding_dim, bias=False),
                                  nn.BatchNorm1d(embedding_dim))
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        embeddings = self.neck(self.backbone(images))
        with torch.autocast(images.device.type, enabled=False):
            logits, loss_logits = self.head(embeddings.float(), labels)
        return embeddings, logits, loss_logits

    def embed_and_classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised fp32 embeddings, fp32 logits) from one forward: the embeddings are what
        retrieval, galleries and open-set scoring compare (evaluation, inference and export use this)."""
        embeddings, logits, _ = self(images)
        return F.normalize(embeddings.float(), dim=1), logits.float()


def create_model(config: ModelConfig, num_classes: int) -> IdentificationModel:
    # Checked here, not by torch: 0 built a head without classes, other values failed deep inside it.
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes {clipped_repr(num_classes)}: the number of individuals must be a whole "
                         "number, at least 1")
    if config.head not in HEADS:
        raise ModelError(f"model.head: unknown head {config.head!r}; known: {', '.join(HEADS)}")
    backbone, feature_dim = create_backbone(config.backbone, config.pretrained)
    head = HEADS[config.head](config, num_classes)
    return IdentificationModel(backbone, feature_dim, config.embedding_dim, head, config.dropout)
