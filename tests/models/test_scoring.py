"""The scoring rules evaluation chooses thresholds for and inference applies (`src.models.scoring`)."""
import numpy as np
import pytest

from src.config import ModelConfig
from src.models.scoring import classifier_scores, gallery_scores, prototypes


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("scale", [30.0, 64.0])
def test_arcface_scores_are_the_cosines_its_logits_scale(scale):
    logits = np.array([[0.5, -1.0, 0.1]]) * scale
    scores = classifier_scores(logits, ModelConfig(head="arcface", arcface_scale=scale))
    assert np.allclose(scores, [[0.5, -1.0, 0.1]])


def test_linear_scores_are_probabilities_even_for_huge_logits():
    logits = np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0]])  # exp(1000) overflows without the shift
    scores = classifier_scores(logits, ModelConfig(head="linear"))
    assert np.all(np.isfinite(scores)) and np.allclose(scores.sum(axis=1), 1.0)
    assert np.allclose(scores[0, :2], [np.e / (1 + np.e), 1 / (1 + np.e)]) and np.allclose(scores[1], 1 / 3)


@pytest.fixture
def gallery():
    """Individual 0 with two photos at right angles, individual 1 with one, enrolled between them."""
    return unit([[1, 0, 0], [0, 0, 1], [0, 1, 0]]), np.array([0, 1, 0])


def test_nearest_scores_each_individual_by_its_most_similar_photo(gallery):
    embeddings, labels = gallery
    query = unit([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    assert np.allclose(gallery_scores("nearest", query, embeddings, labels), [[0.8, 0.0], [0.6, 0.8]])


def test_prototype_scores_are_cosines_to_each_individuals_renormalised_mean(gallery):
    embeddings, labels = gallery
    query = unit([[1, 1, 0]])
    assert np.allclose(prototypes(embeddings, labels, 2), [[np.sqrt(0.5), np.sqrt(0.5), 0], [0, 0, 1]])
    assert np.allclose(gallery_scores("prototype", query, embeddings, labels), [[1.0, 0.0]])


def test_gallery_scores_are_float64_whatever_the_embeddings_dtype(gallery):
    embeddings, labels = gallery
    query = unit([[0.6, 0.8, 0.0]]).astype(np.float32)
    for match in ("nearest", "prototype"):
        assert gallery_scores(match, query, embeddings.astype(np.float32), labels).dtype == np.float64


def test_gallery_scores_are_computed_in_float64_not_just_returned_as_float64():
    """The existing test checks only the dtype of the result, which numpy's type promotion gives even
    when the arithmetic runs on float32-rounded queries. Two queries 1e-9 apart must score apart."""
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1])
    angle = np.array([0.6, 0.6 + 1e-9])
    queries = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    for match in ("nearest", "prototype"):
        scores = gallery_scores(match, queries, gallery, labels)
        np.testing.assert_allclose(scores, queries @ gallery.T, rtol=0, atol=1e-15)
        assert scores[0, 0] != scores[1, 0]  # a real difference, not a float32 tie
