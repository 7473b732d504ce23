"""Each metric on a case small enough to compute by hand, and against scikit-learn where it has one."""
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score, top_k_accuracy_score

from src.evaluation import metrics
from src.evaluation.report import rounded


@pytest.fixture
def random_case():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=200)
    scores = rng.normal(size=(200, 7)) + 1.5 * np.eye(7)[labels]
    return labels, scores


def test_top_k_by_hand():
    labels = np.array([0, 1, 2])
    scores = np.array([[0.9, 0.1, 0.0],    # right at rank 1
                       [0.5, 0.2, 0.3],    # right at rank 3
                       [0.1, 0.3, 0.6]])   # right at rank 1
    assert metrics.top_k_accuracy(labels, scores, 1) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(labels, scores, 2) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(labels, scores, 3) == 1.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_matches_sklearn(random_case, k):
    labels, scores = random_case
    expected = top_k_accuracy_score(labels, scores, k=k, labels=np.arange(7))
    assert metrics.top_k_accuracy(labels, scores, k) == pytest.approx(expected)


def test_top_k_is_written_by_hand_for_what_sklearn_does_otherwise():
    """Why top_k_accuracy is not sklearn's: top-1 must agree with the predictions (argmax: a tie goes
    to the lower class id), and a model of 2 individuals must be scored on a split of one of them."""
    tied = np.array([[1.0, 1.0, 0.0]])
    assert metrics.top_k_accuracy(np.array([0]), tied, 1) == 1.0 and tied.argmax() == 0
    assert top_k_accuracy_score([0], tied, k=1, labels=[0, 1, 2]) == 0.0
    two = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert metrics.top_k_accuracy(np.array([1, 1]), two, 1) == 0.5
    with pytest.raises(ValueError, match="binary"):
        top_k_accuracy_score([1, 1], two, k=1, labels=[0, 1])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_by_hand_and_against_sklearn():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 0, 0, 1, 1, 0, 2, 3])  # class 3 is never true: it only costs recall
    scores = np.eye(4)[predictions]
    result = metrics.classification_metrics(labels, scores)
    assert result["top1"] == pytest.approx(5 / 8)
    assert result["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    # F1 per class: 0: p=3/4 r=3/4; 1: p=1/2 r=1/2; 2: p=1 r=1/2 -> 2/3
    assert result["macro_f1"] == pytest.approx((3 / 4 + 1 / 2 + 2 / 3) / 3)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert result["macro_f1"] == pytest.approx(f1_score(labels, predictions, labels=[0, 1, 2], average="macro"))
    assert result["num_images"] == 8


def test_confusion_and_per_individual_table():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 2, 2, 1, 1, 0])
    matrix = metrics.confusion(labels, predictions, 4)
    assert matrix.tolist() == [[1, 0, 2, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    table = metrics.per_individual(matrix, ["a", "b", "c", "d"])
    assert [row["individual"] for row in table] == ["a", "b", "c"]  # d has no image
    assert table[0] == {"individual": "a", "support": 3, "accuracy": pytest.approx(1 / 3),
                        "most_confused_with": "c", "confused_count": 2}
    assert table[1]["most_confused_with"] is None and table[1]["accuracy"] == 1.0
    assert table[2]["most_confused_with"] == "a" and table[2]["accuracy"] == 0.0
    # a tie between wrong predictions goes to the lower class id
    tied = metrics.per_individual(np.array([[1, 0, 2, 2], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), list("abcd"))
    assert (tied[0]["most_confused_with"], tied[0]["confused_count"]) == ("c", 2)


def test_top5_counts_a_label_ranked_fifth():
    scores = np.array([[0.5, 0.9, 0.8, 0.7, 0.6, 0.0]])  # the true individual, 0, ranks fifth of six
    assert metrics.classification_metrics(np.array([0]), scores)["top5"] == 1.0
    assert metrics.classification_metrics(np.array([5]), scores)["top5"] == 0.0


def ranked_similarity(gallery_order_labels: list[int]) -> np.ndarray:
    """One query whose similarity to gallery image i decreases with i."""
    return np.linspace(1.0, 0.0, len(gallery_order_labels))[None, :]


def test_one_nn_and_map_at_r_by_hand():
    # Gallery ranked A B A A B C for a query of A: R = 3, AP@R = (1/3) * (1/1 + 0 + 2/3) = 5/9
    gallery = np.array([0, 1, 0, 0, 1, 2])
    similarity = ranked_similarity(gallery.tolist())
    query = np.array([0])
    assert metrics.one_nn_accuracy(similarity, query, gallery) == 1.0
    assert metrics.map_at_r(similarity, query, gallery) == pytest.approx(5 / 9)
    # a query of B: R = 2, ranked B at 2 only within the first 2 -> (1/2) * (1/2) = 1/4
    assert metrics.map_at_r(similarity, np.array([1]), gallery) == pytest.approx(1 / 4)
    assert metrics.one_nn_accuracy(similarity, np.array([1]), gallery) == 0.0
    # two queries average
    both = np.vstack([similarity, similarity])
    assert metrics.map_at_r(both, np.array([0, 1]), gallery) == pytest.approx((5 / 9 + 1 / 4) / 2)


def test_cmc_counts_individuals_not_images():
    # Gallery ranked B B B C A for a query of A: image rank 5, individual rank 3.
    gallery = np.array([1, 1, 1, 2, 0])
    similarity = ranked_similarity(gallery.tolist())
    curve = metrics.cmc(similarity, np.array([0]), gallery, max_rank=4)
    assert curve.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_cmc_is_monotone_and_starts_at_one_nn(random_case):
    labels, _ = random_case
    rng = np.random.default_rng(1)
    gallery = np.repeat(np.arange(7), 5)
    similarity = rng.normal(size=(len(labels), len(gallery))) + (labels[:, None] == gallery[None, :])
    curve = metrics.cmc(similarity, labels, gallery)
    assert len(curve) == metrics.CMC_RANKS
    assert np.all(np.diff(curve) >= 0) and curve[-1] == 1.0  # 7 individuals: all found by rank 7
    assert curve[0] == pytest.approx(metrics.one_nn_accuracy(similarity, labels, gallery))


def test_cmc_ties_count_against_the_model():
    similarity = np.array([[0.5, 0.5]])
    assert metrics.cmc(similarity, np.array([1]), np.array([0, 1]), max_rank=2).tolist() == [0.0, 1.0]


def test_unknown_auroc_matches_sklearn():
    rng = np.random.default_rng(2)
    best = rng.uniform(size=50)
    unknown = rng.uniform(size=50) < 0.4
    assert metrics.unknown_auroc(best, unknown) == pytest.approx(roc_auc_score(unknown, 1 - best))
    # unknown images all less similar than known ones: perfect detection
    assert metrics.unknown_auroc(np.array([0.9, 0.8, 0.3, 0.2]), np.array([False, False, True, True])) == 1.0


def test_baks_and_baus_by_hand():
    # Known: individual 0 has 4 images (2 accepted and right, 1 accepted but wrong, 1 rejected),
    # individual 1 has 1 image (accepted, right): BAKS = (2/4 + 1/1) / 2 = 0.75, while plain
    # accuracy would be 3/5.
    labels = np.array([0, 0, 0, 0, 1])
    correct = np.array([True, True, False, True, True])
    accepted = np.array([True, True, True, False, True])
    assert metrics.baks(labels, correct, accepted) == pytest.approx(0.75)
    # Unknown: individual 5 has 3 images, 1 rejected; individual 6 has 1 image, rejected: (1/3 + 1) / 2
    assert metrics.baus(np.array([5, 5, 5, 6]), np.array([True, True, False, False])) == pytest.approx(2 / 3)


def test_open_set_threshold_separates_known_from_unknown():
    known_labels, known_correct = np.array([0, 1, 1]), np.array([True, True, False])
    known_scores = np.array([0.9, 0.8, 0.65])
    unknown_labels, unknown_scores = np.array([7, 7, 8]), np.array([0.5, 0.6, 0.3])
    threshold = metrics.choose_open_set_threshold(known_labels, known_correct, known_scores,
                                                  unknown_labels, unknown_scores)
    # Rejecting the wrong known image (0.65) costs nothing and the two correct ones must stay accepted:
    # the lowest best interval is (0.6, 0.65], whose midpoint is chosen.
    assert threshold == pytest.approx(0.625)
    accepted_known, accepted_unknown = known_scores >= threshold, unknown_scores >= threshold
    assert metrics.baks(known_labels, known_correct, accepted_known) == pytest.approx(0.75)
    assert metrics.baus(unknown_labels, accepted_unknown) == 1.0


def test_open_set_threshold_does_not_split_scores_it_cannot_tell_apart():
    # 4e-7 apart: halfway (0.7000002) would be stored as 0.7, which accepts the unknown image too
    known_labels, known_correct, known_scores = np.array(["a", "b"]), np.array([True, True]), np.array([0.7000004, 0.9])
    threshold = metrics.choose_open_set_threshold(known_labels, known_correct, known_scores,
                                                  np.array(["u", "u"]), np.array([0.7, 0.2]))
    assert threshold == 0.45  # rejects the unknown image it can reject, keeps both known ones


def test_open_set_threshold_is_optimal_on_random_scores():
    rng = np.random.default_rng(3)
    known_labels, unknown_labels = rng.integers(0, 5, 60), rng.integers(10, 13, 30)
    known_correct = rng.uniform(size=60) < 0.8
    known_scores, unknown_scores = rng.uniform(0.3, 1.0, 60), rng.uniform(0.0, 0.7, 30)
    threshold = metrics.choose_open_set_threshold(known_labels, known_correct, known_scores,
                                                  unknown_labels, unknown_scores)

    def objective(t):
        return (metrics.baks(known_labels, known_correct, known_scores >= t)
                + metrics.baus(unknown_labels, unknown_scores >= t)) / 2

    best = max(objective(t) for t in np.linspace(-0.01, 1.01, 2000))
    assert objective(threshold) == pytest.approx(best) or objective(threshold) > best


def test_keep_fraction_threshold():
    scores = np.arange(1, 21) / 20  # 0.05 .. 1.0
    threshold = metrics.keep_fraction_threshold(scores, keep=0.95)
    assert threshold == pytest.approx(0.075)  # halfway between the one score it may lose and the next
    assert (scores >= threshold).mean() == 0.95
    assert metrics.keep_fraction_threshold(scores[:10], keep=0.95) < 0.05  # 10 scores: it may lose none
    tied = np.array([0.5, 0.5] + [0.9] * 18)  # the score it may lose is tied with the next: both kept
    assert metrics.keep_fraction_threshold(tied, keep=0.95) == pytest.approx(0.5 - metrics.OUTER_MARGIN)
    close = np.array([0.3000001, 0.3000004] + [0.9] * 18)  # a hair apart: both kept, with the margin
    assert metrics.keep_fraction_threshold(close, keep=0.95) == round(0.3000001 - metrics.OUTER_MARGIN, 6)
    # 1.02e-5 apart: no stored threshold is both OUTER_MARGIN below the kept one and above the other
    margin_apart = np.r_[0.4999901, 0.5000003, np.linspace(0.6, 0.9, 18)]
    assert (margin_apart >= metrics.keep_fraction_threshold(margin_apart)).sum() == 20
    assert metrics.keep_fraction_threshold(np.array([])) is None


def test_thresholds_hold_as_stored_and_on_recomputed_scores():
    """Inference applies the threshold as report.json and the sidecar store it (6 decimals) to scores
    recomputed in float32: every image must stay on the side it was on when the threshold was chosen."""
    rng = np.random.default_rng(0)
    for trial in range(600):
        correct = rng.uniform(-0.2, 1.0, 20)
        known = rng.uniform(0.3, 1.0, 12)
        unknown = rng.uniform(0.0, 0.7, 8)
        if trial % 2:  # scores a hair apart (softmax probabilities crowd below 1): every pair a few 1e-7 apart
            correct, known, unknown = (0.5 + np.round(part * 20) * 1e-7 for part in (correct, known, unknown))
        known_labels, known_correct, unknown_labels = np.arange(12) % 4, known > 0.4, np.arange(8) % 3
        chosen = {"keep": (correct, metrics.keep_fraction_threshold(correct)),
                  "open": (np.concatenate([known, unknown]), metrics.choose_open_set_threshold(
                      known_labels, known_correct, known, unknown_labels, unknown))}
        for name, (scores, threshold) in chosen.items():
            stored = rounded(threshold)
            for recomputed in (scores, scores.astype(np.float32), scores + 1e-7, scores - 1e-7):
                assert np.array_equal(recomputed >= stored, scores >= threshold), (name, threshold, stored)
        assert (correct >= chosen["keep"][1]).mean() >= 0.95


def test_retrieval_metrics_match_pytorch_metric_learning():
    """1-NN accuracy and mAP@R against the reference implementation of the paper that defined mAP@R
    (pytorch-metric-learning's AccuracyCalculator; gallery separate from the queries, cosine)."""
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    query_labels, gallery_labels = rng.integers(0, 6, 40), np.repeat(np.arange(6), [3, 5, 2, 7, 4, 6])
    normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    queries = normalise(centres[query_labels] + rng.normal(scale=1.2, size=(40, 16)))
    gallery = normalise(centres[gallery_labels] + rng.normal(scale=1.2, size=(len(gallery_labels), 16)))
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                                    knn_func=CustomKNN(CosineSimilarity()), k="max_bin_count")
    reference = calculator.get_accuracy(torch.from_numpy(queries), torch.from_numpy(query_labels),
                                        torch.from_numpy(gallery), torch.from_numpy(gallery_labels),
                                        ref_includes_query=False)
    similarity = queries @ gallery.T
    assert 0.2 < reference["precision_at_1"] < 0.95  # neither trivial nor hopeless
    assert metrics.one_nn_accuracy(similarity, query_labels, gallery_labels) == pytest.approx(
        reference["precision_at_1"])
    assert metrics.map_at_r(similarity, query_labels, gallery_labels) == pytest.approx(
        reference["mean_average_precision_at_r"])


def test_an_accept_all_open_set_threshold_keeps_a_margin_below_the_lowest_score():
    """met8: the "accept all" candidate must sit OUTER_MARGIN below the lowest score, not on it: on it,
    the lowest known image flips to `unknown` once the threshold is stored (6 decimals) and the score is
    recomputed in float32. Here accepting all ties with rejecting all, and the lowest candidate wins."""
    known_labels, known_correct, known_scores = np.array([0]), np.array([True]), np.array([0.3])
    unknown_labels, unknown_scores = np.array([7]), np.array([0.6])
    threshold = metrics.choose_open_set_threshold(known_labels, known_correct, known_scores,
                                                  unknown_labels, unknown_scores)
    assert threshold == pytest.approx(0.3 - metrics.OUTER_MARGIN)
    for recomputed in (known_scores, known_scores.astype(np.float32), known_scores - 1e-7):
        assert (recomputed >= rounded(threshold)).all()


def test_keep_fraction_counts_the_images_it_may_lose_despite_float_rounding():
    """met13: (1 - 0.9) * 10 is 0.9999999999999998 in floating point; truncating it would let the
    rule lose no image where it may lose one."""
    scores = np.arange(1, 11) / 10  # 0.1 .. 1.0
    assert metrics.keep_fraction_threshold(scores, keep=0.9) == pytest.approx(0.15)


def test_retrieval_refuses_a_query_individual_without_gallery_images():
    # Individual 1 has no gallery image: CMC scored it as its neighbour in the sorted individuals (2),
    # rank 1 = 1.0 for a query that can never be right, and mAP@R was NaN.
    gallery, queries = np.array([0, 0, 2, 2]), np.array([1, 0])
    similarity = np.array([[0.1, 0.2, 0.9, 0.8], [0.9, 0.1, 0.3, 0.2]])
    with pytest.raises(ValueError, match="no gallery image"):
        metrics.cmc(similarity, queries, gallery)
    with pytest.raises(ValueError, match="no gallery image"):
        metrics.map_at_r(similarity, queries, gallery)


def test_every_metric_matches_a_brute_force_loop_on_tied_scores():
    """Scores drawn from three values, so that ties are everywhere; small splits, one class, one image,
    individuals missing from the predictions. Each metric against a loop written from its definition
    with the documented tie rules (classifier: lower class id first; 1-NN and mAP@R: gallery order;
    CMC: an individual tied with the true one ranks before it; AUROC: a tie counts one half)."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        classes, count = int(rng.integers(2, 7)), int(rng.integers(1, 12))
        labels, scores = rng.integers(0, classes, count), rng.integers(0, 3, (count, classes)) / 2
        ranked = [sorted(range(classes), key=lambda c: (-row[c], c)) for row in scores]
        for k in range(1, classes + 1):
            expected = np.mean([label in order[:k] for label, order in zip(labels, ranked)])
            assert metrics.top_k_accuracy(labels, scores, k) == pytest.approx(expected)
        predictions = np.array([order[0] for order in ranked])
        result = metrics.classification_metrics(labels, scores)
        recalls, f1s = [], []
        for c in np.unique(labels):
            hits = np.sum((predictions == c) & (labels == c))
            predicted, actual = np.sum(predictions == c), np.sum(labels == c)
            recalls.append(hits / actual)
            f1s.append(2 * hits / (predicted + actual))
        assert result["balanced_accuracy"] == pytest.approx(np.mean(recalls))
        assert result["macro_f1"] == pytest.approx(np.mean(f1s))
        matrix = metrics.confusion(labels, predictions, classes)
        assert result["top1"] == pytest.approx(np.trace(matrix) / count)
        assert np.mean([row["accuracy"] for row in metrics.per_individual(matrix, list("abcdef"))]) == pytest.approx(
            result["balanced_accuracy"])

        gallery_labels = rng.integers(0, classes, int(rng.integers(1, 10)))
        query_labels = rng.choice(np.unique(gallery_labels), count)
        similarity = rng.integers(0, 3, (count, len(gallery_labels))) / 2
        precisions, nearest, individual_ranks = [], [], []
        for query, row in zip(query_labels, similarity):
            order = sorted(range(len(gallery_labels)), key=lambda j: (-row[j], j))
            relevant = [gallery_labels[j] == query for j in order]
            r = sum(relevant)
            precisions.append(sum(np.mean(relevant[:i + 1]) for i in range(r) if relevant[i]) / r)
            nearest.append(relevant[0])
            best = {individual: row[gallery_labels == individual].max() for individual in np.unique(gallery_labels)}
            individual_ranks.append(sum(score >= best[query] for score in best.values()))
        assert metrics.map_at_r(similarity, query_labels, gallery_labels) == pytest.approx(np.mean(precisions))
        assert metrics.one_nn_accuracy(similarity, query_labels, gallery_labels) == pytest.approx(np.mean(nearest))
        assert metrics.cmc(similarity, query_labels, gallery_labels) == pytest.approx(
            [np.mean(np.array(individual_ranks) <= k) for k in range(1, metrics.CMC_RANKS + 1)])

        best_similarity, unknown = rng.integers(0, 4, 10) / 3, np.arange(10) < int(rng.integers(1, 10))
        pairs = [(u > k) + 0.5 * (u == k) for u in 1 - best_similarity[unknown] for k in 1 - best_similarity[~unknown]]
        assert metrics.unknown_auroc(best_similarity, unknown) == pytest.approx(np.mean(pairs))


def test_a_threshold_is_never_stored_within_score_noise_of_a_score():
    """The 6-decimal midpoint of 0.4999999 and 0.5000009 is 0.5, 1e-7 above the lower score: a float32
    recomputation of that score may reach 0.5 and be accepted, so no threshold separates the two."""
    assert metrics.separating(0.4, 0.5) == 0.45
    assert metrics.separating(0.3, 0.300004) == 0.300002  # stored with 6 decimals: 5 would give 0.3, on a score
    assert metrics.separating(0.4999999, 0.5000009) is None


def test_a_reject_all_open_set_threshold_keeps_a_margin_above_the_highest_score():
    """The only known image is misidentified and scores below the unknown one: rejecting everything is
    best, and the unknown image at the top must stay rejected once stored and recomputed."""
    threshold = metrics.choose_open_set_threshold(np.array([0]), np.array([False]), np.array([0.2]),
                                                  np.array([7]), np.array([0.6]))
    assert threshold == pytest.approx(0.6 + metrics.OUTER_MARGIN)
    for recomputed in (np.float64(0.6), np.float32(0.6), 0.6 + 1e-7):
        assert recomputed < rounded(threshold)


def test_keep_fraction_threshold_stays_outer_margin_below_the_lowest_kept_score():
    """1.5e-5 apart: halfway (0.500008) is closer to the kept score than OUTER_MARGIN; 0.500005 is not."""
    scores = np.r_[0.5, 0.500015, np.linspace(0.6, 0.9, 18)]
    assert metrics.keep_fraction_threshold(scores, keep=0.95) == pytest.approx(0.500015 - metrics.OUTER_MARGIN)
