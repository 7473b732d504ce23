"""Evaluation metrics as pure functions on numpy arrays.

Classification takes integer labels (the class id) and a score matrix (`N x C`, higher = more
likely; logits work). Retrieval and open-set labels may be ids or names (anything numpy compares with
`==` and sorts). Retrieval takes a similarity matrix (`queries x gallery`, cosine similarity of
L2-normalised embeddings) and assumes every query's individual has at least one gallery image (the
caller checks that). Open-set functions take each query's best gallery similarity.

scikit-learn computes what it has (balanced accuracy, macro-F1, the confusion matrix, AUROC); written
here by hand, with the definition in each docstring, are top-k accuracy (one line, checked against
`sklearn.metrics.top_k_accuracy_score` in the tests; that one gives a tie to the higher class id, where
the predictions and the confusion matrix take the lower, and refuses a 2-individual score matrix whose
labels hold one individual), 1-NN accuracy and mAP@R (checked against
pytorch-metric-learning's AccuracyCalculator in the tests; here they share one similarity matrix
with the CMC curve and the gallery matching, on numpy, instead of a kNN search each), the CMC curve,
BAKS/BAUS and the threshold choices, which neither library has.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from src.evaluation.report import DECIMALS
from src.models.scoring import individual_scores

CMC_RANKS = 10
CLOSED_SET_KEEP = 0.95
# How far outside the observed scores an "accept all" or "reject all" threshold lies.
OUTER_MARGIN = 1e-5
# A threshold is stored with DECIMALS decimals (report.json, the sidecar) and inference applies it to
# scores it recomputes in float32: a gallery's differ from evaluation's by ~1e-8, and near 1 float32
# steps by 6e-8. So a threshold never sits on an observed score, nor closer to one than this, or the
# image there would land on either side of it.
SCORE_NOISE = 2e-7


# --- closed set: the classifier --------------------------------------------------------------------

def top_k_accuracy(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Fraction of images whose label is among the `k` highest scores (ties: lower class id first)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    """Top-1, top-5, balanced accuracy and macro-F1 of the classifier's scores.

    Balanced accuracy is the mean per-individual recall over the individuals in `labels`; macro-F1
    averages F1 over the same individuals (an individual never in `labels` has no recall to average,
    but predicting it still costs the true individual its recall).
    """
    predictions = scores.argmax(axis=1)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected, those classes are left out on purpose.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(labels, predictions)
    return {"num_images": int(len(labels)),
            "top1": top_k_accuracy(labels, scores, 1),
            "top5": top_k_accuracy(labels, scores, min(5, scores.shape[1])),
            "balanced_accuracy": float(balanced),
            "macro_f1": float(f1_score(labels, predictions, labels=np.unique(labels), average="macro",
                                       zero_division=0))}


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """`C x C` counts, row = true individual, column = predicted individual."""
    return confusion_matrix(labels, predictions, labels=np.arange(num_classes))


def per_individual(matrix: np.ndarray, names: list[str]) -> list[dict]:
    """Support, accuracy and the most frequent wrong prediction of every individual with images.

    `most_confused_with` is None when no image of the individual was misclassified; ties between
    wrong predictions go to the lower class id.
    """
    rows = []
    for index, counts in enumerate(matrix):
        support = int(counts.sum())
        if support == 0:
            continue
        wrong = counts.copy()
        wrong[index] = 0
        other = int(wrong.argmax())
        rows.append({"individual": names[index], "support": support,
                     "accuracy": float(counts[index] / support),
                     "most_confused_with": names[other] if wrong[other] else None,
                     "confused_count": int(wrong[other])})
    return rows


# --- retrieval: embeddings against a gallery -------------------------------------------------------

def one_nn_accuracy(similarity: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> float:
    """Fraction of queries whose most similar gallery image shows the same individual (ties: first in
    the gallery)."""
    return float((gallery_labels[similarity.argmax(axis=1)] == query_labels).mean())


def map_at_r(similarity: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> float:
    """Mean average precision at R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", 2020).

    For a query with R gallery images of its individual: AP@R = (1/R) * sum_{i<=R} P(i) * rel(i), where
    rel(i) says whether the i-th most similar gallery image is of the query's individual and P(i) is the
    precision among the first i. Unlike 1-NN accuracy it rewards ranking *all* of an individual's images
    first, so it separates embeddings that 1-NN rates the same. Ties: gallery order.
    """
    _check_in_gallery(query_labels, gallery_labels)
    order = np.argsort(-similarity, axis=1, kind="stable")
    relevant = gallery_labels[order] == query_labels[:, None]
    r = (gallery_labels[None, :] == query_labels[:, None]).sum(axis=1)
    ranks = np.arange(1, similarity.shape[1] + 1)
    precision = np.cumsum(relevant, axis=1) / ranks
    within_r = ranks[None, :] <= r[:, None]
    return float(((precision * relevant * within_r).sum(axis=1) / r).mean())


def cmc(similarity: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
        max_rank: int = CMC_RANKS) -> np.ndarray:
    """Cumulative match characteristic over individuals, ranks 1..`max_rank`.

    Each gallery individual is scored by its most similar image; entry k-1 is the fraction of queries
    whose individual is among the k best-scored ones, i.e. "is the right chimpanzee among the k
    suggestions", comparable with the classifier's top-k (rank 1 equals 1-NN accuracy). Counting
    individuals rather than images keeps several images of one wrong individual from filling the list.
    Ties count against the model: an individual scored equal to the true one ranks before it.
    """
    _check_in_gallery(query_labels, gallery_labels)
    individuals, scores = individual_scores(similarity, gallery_labels)
    true_scores = scores[np.arange(len(scores)), np.searchsorted(individuals, query_labels)]
    rank = (scores >= true_scores[:, None]).sum(axis=1)
    return np.array([(rank <= k).mean() for k in range(1, max_rank + 1)], dtype=np.float64)


def _check_in_gallery(query_labels: np.ndarray, gallery_labels: np.ndarray) -> None:
    """A query individual without a gallery image has no R for mAP@R (NaN) and no column in the CMC's
    per-individual scores (`searchsorted` would silently score it as a neighbouring individual)."""
    missing = np.setdiff1d(np.unique(query_labels), np.unique(gallery_labels))
    if len(missing):
        raise ValueError(f"{len(missing)} query individual(s) have no gallery image (e.g. {missing[0]!r})")


def retrieval_metrics(similarity: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> dict:
    return {"num_queries": int(len(query_labels)),
            "one_nn_accuracy": one_nn_accuracy(similarity, query_labels, gallery_labels),
            "map_at_r": map_at_r(similarity, query_labels, gallery_labels),
            "cmc": cmc(similarity, query_labels, gallery_labels).tolist()}


# --- open set: rejecting individuals the gallery does not hold -------------------------------------

def unknown_auroc(best_similarity: np.ndarray, is_unknown: np.ndarray) -> float:
    """AUROC of detecting an unknown individual with score `1 - best gallery similarity` (unknown =
    positive): the chance that a random unknown image is less similar to the gallery than a random
    known one, whatever the threshold."""
    return float(roc_auc_score(is_unknown, 1.0 - best_similarity))


def _mean_per_individual(labels: np.ndarray, values: np.ndarray) -> float:
    """Mean over individuals of the mean of `values` over each individual's images."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return float((np.bincount(inverse, weights=values) / counts).mean())


def baks(labels: np.ndarray, correct: np.ndarray, accepted: np.ndarray) -> float:
    """Balanced accuracy on known samples (AnimalCLEF): per known individual, the fraction of its images
    that are both accepted (best similarity >= threshold) and correctly identified; then the mean over
    individuals, so that individuals with many photos do not dominate."""
    return _mean_per_individual(labels, (correct & accepted).astype(np.float64))


def baus(labels: np.ndarray, accepted: np.ndarray) -> float:
    """Balanced accuracy on unknown samples (AnimalCLEF): per unknown individual, the fraction of its
    images rejected as "new individual"; then the mean over individuals."""
    return _mean_per_individual(labels, (~accepted).astype(np.float64))


def choose_open_set_threshold(known_labels: np.ndarray, known_correct: np.ndarray, known_scores: np.ndarray,
                              unknown_labels: np.ndarray, unknown_scores: np.ndarray) -> float:
    """The similarity threshold (accept iff best similarity >= t) maximising (BAKS + BAUS) / 2.

    The objective only changes at observed scores, so the candidates are just below the lowest score
    (accept all), the midpoints between consecutive distinct scores (a margin on both sides, as far
    from either image as possible; see `separating`) and just above the highest score (reject all).
    Among equally good candidates the lowest wins, so that as few known images as possible are rejected.
    """
    scores = np.unique(np.concatenate([known_scores, unknown_scores]).astype(np.float64)).tolist()
    between = (separating(lower, upper) for lower, upper in zip(scores[:-1], scores[1:]))
    candidates = [round(scores[0] - OUTER_MARGIN, DECIMALS), *(t for t in between if t is not None),
                  round(scores[-1] + OUTER_MARGIN, DECIMALS)]
    objective = [(baks(known_labels, known_correct, known_scores >= t) + baus(unknown_labels, unknown_scores >= t)) / 2
                 for t in candidates]
    return candidates[int(np.argmax(objective))]


def separating(lower: float, upper: float) -> float | None:
    """The threshold that accepts `upper` and rejects `lower` as stored and applied by inference: the
    DECIMALS-decimal value nearest their midpoint, when it is at least SCORE_NOISE from both; None when
    the two are too close to be told apart (no stored value lies between them with that margin)."""
    threshold = round((lower + upper) / 2, DECIMALS)
    return threshold if lower + SCORE_NOISE <= threshold <= upper - SCORE_NOISE else None


def keep_fraction_threshold(correct_scores: np.ndarray, keep: float = CLOSED_SET_KEEP) -> float | None:
    """A similarity threshold that accepts at least `keep` of the given (correct-match) scores: halfway
    between the lowest score it keeps and the highest one below that, but at least OUTER_MARGIN below
    the former. Scores tied with it are kept, and so is a score below it that no stored threshold
    can reject while keeping it: then the threshold goes halfway below that one (see `separating`),
    and so on down.

    A heuristic for a model trained without held-out individuals: nothing tells how unknown animals
    score, so the threshold only bounds how many correct matches a rejection rule may lose.
    None when there are no scores.
    """
    if len(correct_scores) == 0:
        return None
    ordered = np.sort(np.asarray(correct_scores, dtype=np.float64))
    may_lose = int(round((1.0 - keep) * len(ordered), 9))  # round: 0.05 * 20 is 1.0000000000000009
    lowest_kept = float(ordered[may_lose])
    at_most = round(lowest_kept - OUTER_MARGIN, DECIMALS)
    upper = lowest_kept
    for lower in np.unique(ordered[ordered < lowest_kept])[::-1].tolist():
        halfway = separating(lower, upper)
        if halfway is not None and min(halfway, at_most) >= lower + SCORE_NOISE:
            return min(halfway, at_most)
        upper = lower
    return round(upper - OUTER_MARGIN, DECIMALS)  # below every score: all are kept
