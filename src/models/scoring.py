"""How a model's outputs become one score per individual: the rules evaluation chooses its thresholds
for and inference applies, kept in one place so that the two cannot drift apart.

Each kind of score has its own scale, so each gets its own threshold (`SCORE_KINDS`):
- `classifier`: the head's logits over the training individuals (no gallery);
- `nearest`: a gallery individual's most similar enrolled photo;
- `prototype`: the individual's mean embedding in a gallery.
Embeddings are unit vectors, so a gallery score is a cosine similarity; it is computed in float64,
so that ties are real ties.
"""
from __future__ import annotations

import numpy as np

from src.config import ModelConfig

SCORE_KINDS = ("classifier", "nearest", "prototype")
MATCH_MODES = SCORE_KINDS[1:]  # how a gallery matches a photo


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# model.head -> its logits as scores, higher = more likely. ArcFace logits are `scale * cosine(embedding,
# class centre)`, so dividing by the scale gives a cosine in [-1, 1], on the same footing as gallery
# similarities. A linear head's logits have no such meaning; their softmax (a probability) is used.
HEAD_SCORES = {
    "arcface": lambda logits, model: logits / model.arcface_scale,
    "linear": lambda logits, model: _softmax(logits),
}


def classifier_scores(logits: np.ndarray, model: ModelConfig) -> np.ndarray:
    """`N x classes`: the `classifier` kind's scores over the training individuals."""
    return HEAD_SCORES[model.head](logits, model)


def prototypes(embeddings: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Each individual's mean embedding (labels 0..count-1), renormalised to unit length."""
    sums = np.zeros((count, embeddings.shape[1]))
    np.add.at(sums, labels, embeddings.astype(np.float64))
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def individual_scores(similarity: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(individuals, scores)`: each query's best similarity to each gallery individual, `Q x I`."""
    order = np.argsort(gallery_labels, kind="stable")
    individuals, starts = np.unique(gallery_labels[order], return_index=True)
    return individuals, np.maximum.reduceat(similarity[:, order], starts, axis=1)


def _nearest(queries: np.ndarray, embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return individual_scores(queries @ embeddings.astype(np.float64).T, labels)[1]


def _prototype(queries: np.ndarray, embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return queries @ prototypes(embeddings, labels, int(labels.max()) + 1).T


MATCHES = {"nearest": _nearest, "prototype": _prototype}  # match mode -> its scores (MATCH_MODES, tested)


def gallery_scores(match: str, queries: np.ndarray, gallery_embeddings: np.ndarray,
                   gallery_labels: np.ndarray) -> np.ndarray:
    """`N x I`: each query's score for each gallery individual (labels 0..I-1, each enrolled at least
    once), by its `nearest` enrolled photo or by its `prototype`."""
    return MATCHES[match](queries.astype(np.float64), gallery_embeddings, gallery_labels)
