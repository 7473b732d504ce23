"""The gallery study's open-set table: each way of scoring is cut at its own stored threshold."""
import json
import types

from src.bench import gallery_study
from src.inference.identify import Prediction
from src.training.artifacts import threshold_sidecar_path


def test_open_set_study_cuts_each_kind_of_score_at_its_own_threshold(tmp_path, monkeypatch):
    # The model's Identifier carries the classifier's threshold; gallery similarities have another scale.
    checkpoint = tmp_path / "m_best.pt"
    stored = {"classifier": 0.31, "nearest": 0.82, "prototype": 0.64}
    threshold_sidecar_path(checkpoint).write_text(json.dumps(
        {"thresholds": stored, "method": "m", "split": "val", "checkpoint_sha256": "ab"}))
    used = {}

    class Recorder:
        def __init__(self, backend, info, threshold, gallery, match):
            used["classifier" if gallery is None else match] = threshold.value

        def decide(self, items, k):
            return [Prediction("x", ("A",), (0.5,), False) for _ in items]

    monkeypatch.setattr(gallery_study, "Identifier", Recorder)
    monkeypatch.setattr(gallery_study, "Gallery", types.SimpleNamespace(load=lambda path: object()))
    base = types.SimpleNamespace(backend=None, info=types.SimpleNamespace(checkpoint_sha256="ab"))
    result = gallery_study.study_open_set(base, checkpoint, tmp_path / "g.npz", [1], ["A"], [1])
    assert used == stored
    assert {kind: result[kind]["threshold"] for kind in stored} == stored
