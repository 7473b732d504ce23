"""The gallery study's open-set table: each way of scoring is cut at its own stored threshold."""
import json
import types

import pytest

from src.bench import data as bench_data
from src.bench import gallery_study
from src.inference.identify import Prediction
from src.training.artifacts import threshold_sidecar_path
from src.training.stopping import TrainingStopped


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


@pytest.mark.parametrize("options, message", [
    ([], "--device cuda (the default) requested but no CUDA GPU is available; use --device cpu"),
    (["--device", "cpu", "--held-out", "0"], "--held-out must be at least 2"),
    (["--device", "cpu", "--individuals", "5", "--held-out", "4"], "--individuals must leave at least 2 known"),
    (["--device", "cpu", "--images", "2"], "--images must be at least 10"),
    (["--device", "cpu", "--epochs", "0"], "--epochs must be at least 1"),
    (["--device", "cpu", "--size", "8"], "--size must be from 16 to 2048"),
    (["--device", "cpu", "--image-size", "8"], "--image-size 8:"),
    (["--device", "cpu", "--workers", "-1"], "--workers must be at least 0"),  # training's data.workers refuses it
])
def test_bad_options_stop_with_one_line_before_any_work(tmp_path, monkeypatch, capsys, options, message):
    """They used to surface after the stand-in data were made, from training, as a traceback."""
    monkeypatch.setattr(gallery_study.torch.cuda, "is_available", lambda: False)
    assert gallery_study.main(["--out", str(tmp_path / "study"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "study").exists()


def test_a_stopped_training_ends_the_study_in_training_s_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM while the study trained: training saved and raised TrainingStopped, which the
    study let out as a traceback."""
    def stopped(_config):
        raise TrainingStopped("stopped by SIGTERM in epoch 2 after step 3/9; saved x_last.pt", 143, resumable=True)

    monkeypatch.setattr(gallery_study, "prepared_standin", lambda *_args, **_kwargs: tmp_path)
    monkeypatch.setattr(bench_data, "run", stopped)
    with pytest.raises(SystemExit) as stop:
        gallery_study.main(["--out", str(tmp_path / "study"), "--device", "cpu"])
    assert stop.value.code == 143
    assert capsys.readouterr().err == "error: stopped by SIGTERM in epoch 2 after step 3/9; saved x_last.pt\n"
