"""The speed benchmark runs end to end on the CPU and reports consistent figures (not a timing test)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from src.bench import train_speed
from tests.conftest import SHARED

NAIVE = SHARED / "bench" / "naive_reference.py"


def agrees_with_rounded(ratio: float, numerator: float, denominator: float, ratio_step: float) -> bool:
    """Whether `ratio`, rounded to `ratio_step`, can be numerator / denominator where both speeds were
    rounded to 0.1 img/s: on a slow run (5 img/s) their rounding alone moves the ratio by 2%."""
    low = (numerator - 0.05) / (denominator + 0.05) - ratio_step / 2
    high = (numerator + 0.05) / (denominator - 0.05) + ratio_step / 2
    return low - 1e-9 <= ratio <= high + 1e-9


def test_cpu_benchmark_reports_all_three_and_their_ratios(tmp_path, capsys):
    assert train_speed.main(["--device", "cpu", "--arch", "resnet18", "--size", "32", "--batch-size", "8",
                             "--individuals", "4", "--images", "10", "--epochs", "2", "--naive-epochs", "1",
                             "--workers", "1", "--naive-script", str(NAIVE), "--work-dir", str(tmp_path),
                             "--profile", "--profile-rows", "5",
                             "--profile-trace", str(tmp_path / "traces")]) == 0
    output = capsys.readouterr().out
    assert "stand-in data: 4 x 10 images" in output and "device: CPU" in output
    (result,) = json.loads(output.strip().splitlines()[-1])
    assert result["arch"] == "resnet18" and result["compile_mode"] is None and result["size"] == 32
    assert result["ours_img_s"] > 0 and result["ceiling_img_s"] > 0
    # The whole run (two epochs, cache, checkpoints) outlasts the one timed epoch it is measured by.
    [data] = tmp_path.glob("standin_4x10_37px_0out")  # reused by a later run with the same parameters
    timed_images = len((data / "annotations" / "train.txt").read_text().splitlines()) // 8 * 8
    assert result["ours_epochs"] == 2 and result["ours_wall_s"] > timed_images / result["ours_img_s"]
    # Validation and the checkpoint snapshot are part of each epoch, so the steps alone are faster
    # than the epoch as a whole, by exactly their shares (one timed epoch: no medians to blur it).
    assert 0 < result["ours_val_share"] < 1 and 0 < result["ours_rest_share"] < 1
    # Epoch 1 improved on nothing, so a snapshot followed it; it is part of the rest.
    assert 0 < result["ours_snapshot_share"] <= result["ours_rest_share"]
    rest = result["ours_val_share"] + result["ours_rest_share"]
    # The JSON rounds speeds to 0.1 img/s, shares to 0.001 and ratios to 0.001 (ceiling) and 0.01
    # (naive): each comparison allows for its rounding, which a slow run (small figures) magnifies
    # (a busy machine's 5.05 and 4.95 img/s were written 5.0 and 5.0, and their ratio 1.02).
    assert result["ours_steps_img_s"] == pytest.approx(result["ours_img_s"] / (1 - rest), rel=0.02, abs=0.1)
    assert "profile of one epoch of ours, resnet18 (default), top 5 by self_cpu_time_total" in output
    assert "aten::convolution_backward" in output  # the profiled epoch trained the model
    trace = json.loads((tmp_path / "traces" / "resnet18_default.json").read_text())
    assert any(event.get("name") == "aten::convolution_backward" for event in trace["traceEvents"])
    assert agrees_with_rounded(result["ours_vs_ceiling"], result["ours_img_s"], result["ceiling_img_s"], 0.001)
    # A run whose timings moved (a busy machine) says so, where its ratios could otherwise read 500%.
    unsteady = result["ceiling_spread"] > train_speed.UNSTEADY or result["ours_vs_ceiling"] > 1 + train_speed.UNSTEADY
    assert ("note: the ceiling's 5 timing windows differed by" in output) == unsteady
    if NAIVE.is_file():  # ../shared is beside the checkout in CI and here
        assert agrees_with_rounded(result["ours_vs_naive"], result["ours_img_s"], result["naive_img_s"], 0.01)
    else:
        assert result["naive_img_s"] is None


def test_compile_mode_needs_compile(tmp_path):
    with pytest.raises(SystemExit, match="--compile-mode needs torch.compile"):
        train_speed.main(["--device", "cpu", "--no-compile", "--compile-mode", "reduce-overhead",
                          "--work-dir", str(tmp_path)])


def test_union_of_profiler_intervals_counts_overlaps_once():
    ranges = [SimpleNamespace(start=s, end=e) for s, e in [(5, 8), (0, 2), (1, 3), (10, 10), (6, 7)]]
    assert train_speed._union_seconds(ranges) == pytest.approx((3 + 3) / 1e6)
    assert train_speed._union_seconds([]) == 0


def test_each_timed_epoch_holds_the_save_that_followed_the_previous_row():
    history = [{"epoch": epoch} for epoch in (1, 2, 3)]
    assert train_speed.timed_epochs(history, [0.1, 0.2, 0.3]) == [(history[1], 0.1), (history[2], 0.2)]
    assert train_speed.timed_epochs(history[:1], [0.1]) == [(history[0], 0.0)]


def test_compile_seconds_count_the_lazily_compiled_backward():
    """The backward graph compiles at the first backward, outside Dynamo's timer of the forward:
    the benchmark's compile figure must grow then too. (A hit in AOTAutograd's cache, on disk across
    processes, loads both graphs at the forward instead: off here, so that the backward compiles.)"""
    import torch

    torch._dynamo.reset()
    layer = torch.nn.Linear(4, 2)
    compiled = torch.compile(layer, dynamic=False)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        before = train_speed.compile_seconds()
        output = compiled(torch.randn(3, 4))
        after_forward = train_speed.compile_seconds()
        output.sum().backward()
        after_backward = train_speed.compile_seconds()
    assert after_forward["graphs"] > before["graphs"]
    assert after_backward["backward graphs"] > after_forward["backward graphs"]
    assert after_backward["graphs"] == after_forward["graphs"]


@pytest.mark.parametrize("option, message", [
    (["--arch", "resnet9"], "argument --arch: invalid choice: 'resnet9'"),  # was the naive script's traceback
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--size", "8"], "--size 8: Input should be greater than or equal to 32"),  # was standin's own usage
    (["--images", "4"], "--images must be at least 10"),  # was prepare's failure, after the data was made
    (["--epochs", "1"], "--epochs must be at least 2"),
])
def test_bad_options_are_refused_before_any_data_is_made(tmp_path, capsys, option, message):
    assert train_speed.main(["--device", "cpu", "--work-dir", str(tmp_path), *option]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cuda_without_a_gpu_is_refused_before_any_data_is_made(tmp_path, capsys, monkeypatch):
    """Before, the stand-in data were made, then a RuntimeError traceback ("Found no NVIDIA driver")."""
    monkeypatch.setattr(train_speed.torch.cuda, "is_available", lambda: False)
    assert train_speed.main(["--device", "cuda", "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda requested but no CUDA GPU is available; use --device cpu")
    assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("device, expected", [("cpu", 10.0), ("cuda", 500.0)])
def test_the_naive_loop_runs_on_the_device_ours_runs_on(tmp_path, monkeypatch, device, expected):
    """The naive script takes the GPU whenever it sees one: with --device cpu on a GPU machine, ours
    on the CPU was compared with the naive loop on the GPU."""
    script = tmp_path / "naive.py"
    script.write_text("import json, os\n"
                      "on_cpu = os.environ.get('CUDA_VISIBLE_DEVICES') == ''  # what hides the GPU from torch\n"
                      "for epoch in (1, 2):\n"
                      "    print(json.dumps({'epoch': epoch, 'img_per_s': 10.0 if on_cpu else 500.0}))\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(train_speed, "PreparedData", SimpleNamespace(load=lambda root: SimpleNamespace(raw_dir=root)))
    args = SimpleNamespace(naive_script=script, naive_epochs=2, workers=1, batch_size=8, size=32, device=device)
    assert train_speed.naive_throughput("resnet18", tmp_path, args) == expected


def test_a_naive_script_without_epoch_lines_is_named(tmp_path, monkeypatch):
    """Before, a StatisticsError (no lines) or JSONDecodeError / KeyError (other lines) traceback."""
    script = tmp_path / "naive.py"
    script.write_text("print('{starting')\nprint('[1, 2]')\nprint('{\"epoch\": 1, \"speed\": 5}')\n")
    monkeypatch.setattr(train_speed, "PreparedData", SimpleNamespace(load=lambda root: SimpleNamespace(raw_dir=root)))
    args = SimpleNamespace(naive_script=script, naive_epochs=2, workers=1, batch_size=8, size=32, device="cpu")
    with pytest.raises(SystemExit, match=rf"^error: the naive reference {script} printed no epoch line \(a JSON "
                                         "object with a number img_per_s, one per epoch, as naive_reference.py "
                                         r"prints\)$"):
        train_speed.naive_throughput("resnet18", tmp_path, args)


def test_the_naive_speed_is_the_median_of_its_epoch_lines_after_the_first(tmp_path, monkeypatch):
    script = tmp_path / "naive.py"
    lines = ["loading", '{"epoch": 1, "img_per_s": 1.0}', '{"epoch": 2, "img_per_s": 30}', "[1]",
             '{"epoch": 3, "img_per_s": 20.0}', '{"epoch": 4, "img_per_s": 40.0}']
    script.write_text("".join(f"print({line!r})\n" for line in lines))
    monkeypatch.setattr(train_speed, "PreparedData", SimpleNamespace(load=lambda root: SimpleNamespace(raw_dir=root)))
    args = SimpleNamespace(naive_script=script, naive_epochs=4, workers=1, batch_size=8, size=32, device="cpu")
    assert train_speed.naive_throughput("resnet18", tmp_path, args) == 30.0  # of 30, 20, 40: not epoch 1


def test_a_failing_naive_script_is_named_with_its_last_line(tmp_path):
    """Before, a CalledProcessError traceback that did not say why the script failed."""
    script = tmp_path / "naive.py"
    script.write_text("import sys\nsys.exit('ValueError: no such model')\n")
    with pytest.raises(SystemExit, match=rf"^error: the naive reference {script} failed \(exit 1\): "
                                         "ValueError: no such model$"):
        train_speed.main(["--device", "cpu", "--arch", "resnet18", "--size", "32", "--batch-size", "8",
                          "--individuals", "2", "--images", "10", "--naive-script", str(script),
                          "--work-dir", str(tmp_path / "work")])


def test_a_run_whose_timings_moved_says_so():
    """A busy machine once gave ours/ceiling 514% and nothing said the figures were unsound."""
    assert train_speed.unsteady_note(0.05, 0.95, 5) is None
    assert train_speed.unsteady_note(0.34, 0.95, 5).startswith("note: the ceiling's 5 timing windows differed by 34% "
                                                               "and ours ran at 95% of it")
    assert "ours ran at 514% of it" in train_speed.unsteady_note(0.02, 5.14, 5)


def test_a_batch_larger_than_the_stand_in_data_is_named(tmp_path):
    """Before, a ConfigError traceback from the training loop."""
    with pytest.raises(SystemExit, match=r"^error: --batch-size 64 is larger than the 14 training images of the "
                                         r"stand-in data: raise --individuals or --images$"):
        train_speed.main(["--device", "cpu", "--arch", "resnet18", "--size", "32", "--batch-size", "64",
                          "--individuals", "2", "--images", "10", "--work-dir", str(tmp_path)])
