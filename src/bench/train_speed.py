"""Training throughput, three ways, in one run on the same data and model: naive, ours and the ceiling.

1. naive: the user's first loop (`../shared/bench/naive_reference.py`: PIL + torchvision transforms in
   DataLoader workers), run as a subprocess;
2. ours: `src.training.train.run` end to end (augmentation, ArcFace head, optimizer, validation);
3. ceiling: the same model, head and optimizer on one batch already on the device: no data at all.

  python -m src.bench.train_speed                       # GPU: resnet18 and resnet50 at 224 px
  python -m src.bench.train_speed --compile-mode default reduce-overhead   # both, ours and ceiling each
  python -m src.bench.train_speed --device cpu --arch resnet18 --size 112 --individuals 10 --images 24

Prints img/s for each and the ratios, with the device named, and one JSON line to keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.autograd import DeviceType
from torch._dynamo.utils import compile_times
from torch.profiler import ProfilerActivity

from src.bench.data import MIN_IMAGES, prepared_standin, train
from src.config import CompileMode, DataConfig, config_from_dict
from src.data.dataset import PreparedData
from src.errors import command_main, command_parser, path_argument
from src.models.backbones import BACKBONES
from src.training.checkpoint import CheckpointSaver
from src.training.resume import RunState
from src.training.stopping import StopRequest
from src.training.train import (build_model_and_optimizer, evaluate, load_data, make_runtime, seed_everything,
                                train_one_epoch, wrap_for_training)

REPO = Path(__file__).resolve().parents[2]
NAIVE = REPO.parent / "shared" / "bench" / "naive_reference.py"
# Timings steadier than this (the ceiling's windows within 10% of each other, ours at most 10% above
# it) are taken as they are; beyond it the benchmark says the machine's speed changed mid-run.
UNSTEADY = 0.10


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser("src.bench.train_speed", __doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available, else cpu")
    parser.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"], choices=BACKBONES,
                        help="one or more backbones (default: resnet18 resnet50)")
    parser.add_argument("--size", type=int, default=224, help="training image size in pixels (default 224)")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--epochs", type=int, default=6,
                        help="epochs of our loop; the first (compile, warm-up) is not timed (default 6)")
    parser.add_argument("--naive-epochs", type=int, default=2,
                        help="epochs of the naive loop; the first (workers starting) is not timed unless alone "
                             "(default 2)")
    parser.add_argument("--individuals", type=int, default=87, help="stand-in individuals (default 87)")
    parser.add_argument("--images", type=int, default=82,
                        help="per individual (default 82: 87 x 82 ~ the 7,150 of min10)")
    parser.add_argument("--workers", type=int, default=16, help="DataLoader workers of the naive loop (default 16)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: on for CUDA)")
    parser.add_argument("--compile-mode", nargs="+", default=["default"], metavar="MODE",
                        choices=get_args(CompileMode),
                        help="trainer.compile_mode; several: ours and the ceiling are run for each (default: default)")
    parser.add_argument("--naive-script", type=path_argument, default=NAIVE,
                        help="the naive loop to compare with (default: ../shared/bench/naive_reference.py)")
    parser.add_argument("--profile", action="store_true",
                        help="after each measurement, profile one epoch of ours (torch.profiler) and print a table")
    parser.add_argument("--profile-rows", type=int, default=20, help="operators in the profile table (default 20)")
    parser.add_argument("--profile-trace", type=path_argument, default=None, metavar="DIR",
                        help="also write each profiled epoch as a Chrome trace (chrome://tracing, Perfetto) here")
    parser.add_argument("--work-dir", type=path_argument, default=None, help="keep data here (default: a temp dir)")
    args = parser.parse_args(argv)
    # What the naive script, the stand-in generator and prepare would each refuse later, after minutes
    # of data generation, with their own usage lines.
    try:
        DataConfig(image_size=args.size)
    except ValidationError as exc:
        parser.error(f"--size {args.size}: {exc.errors()[0]['msg']}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA GPU is available; use --device cpu")
    problems = {"--batch-size must be at least 2 (BatchNorm needs 2 images a step)": args.batch_size < 2,
                "--individuals must be at least 2": args.individuals < 2,
                f"--images must be at least {MIN_IMAGES} (prepare keeps individuals with that many)":
                    args.images < MIN_IMAGES,
                "--epochs must be at least 2 (the first is not timed)": args.epochs < 2,
                "--naive-epochs and --workers must be at least 1": min(args.naive_epochs, args.workers) < 1}
    for problem, found in problems.items():
        if found:
            parser.error(problem)
    return args


def bench_config(arch: str, mode: str, data_root: Path, work: Path, args, epochs: int):
    num_classes = PreparedData.load(data_root).num_classes
    return config_from_dict({
        "name": f"bench_{arch}_{mode}" if args.compile else f"bench_{arch}",
        "data": {"root": str(data_root), "num_classes": num_classes, "image_size": args.size,
                 "cache_dir": str(work / "cache"), "workers": min(16, max(1, args.workers))},
        "model": {"backbone": arch, "head": "arcface"},
        "trainer": {"max_epochs": epochs, "batch_size": args.batch_size, "device": args.device,
                    "amp": args.device == "cuda", "amp_dtype": "bf16", "compile": args.compile,
                    "compile_mode": mode,
                    "output_dir": str(work / "artifacts"), "progress": "never", "warmup_epochs": 0,
                    "checkpoint_interval_s": 60},  # as in the guide's configs
    })


def naive_throughput(arch: str, data_root: Path, args) -> float | None:
    if not args.naive_script.is_file():
        print(f"naive reference not found at {args.naive_script}; skipped", flush=True)
        return None
    raw_dir = PreparedData.load(data_root).raw_dir
    command = [sys.executable, str(args.naive_script), "--list", str(data_root / "annotations" / "train.txt"),
               "--root", str(raw_dir), "--arch", arch, "--epochs", str(args.naive_epochs),
               "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--size", str(args.size)]
    # The script trains on a GPU whenever one is visible: hidden from it when ours runs on the CPU.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode:
        last = (finished.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"error: the naive reference {args.naive_script} failed (exit {finished.returncode}): {last}")
    speeds = [speed for speed in map(epoch_speed, finished.stdout.splitlines()) if speed is not None]
    if not speeds:
        raise SystemExit(f"error: the naive reference {args.naive_script} printed no epoch line (a JSON object "
                         "with a number img_per_s, one per epoch, as naive_reference.py prints)")
    timed = speeds[1:] or speeds  # the first epoch starts the workers
    return statistics.median(timed)


def epoch_speed(line: str) -> float | None:
    """The img_per_s of one of the naive script's epoch lines; None for any other line."""
    try:
        speed = json.loads(line).get("img_per_s")
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return None
    return float(speed) if isinstance(speed, (int, float)) and not isinstance(speed, bool) else None


@dataclass
class Ours:
    img_s: float  # training images / whole epoch time (checkpoint snapshots included), median over epochs
    steps_img_s: float  # training images / training time alone: the steps without validation
    val_share: float  # validation's share of the epoch time
    snapshot_share: float  # the previous epoch's checkpoint snapshot (CheckpointSaver.save)'s share
    rest_share: float  # the rest: the snapshot, the epoch line, the epoch's bookkeeping
    wall_s: float  # the whole run: compilation, cache and checkpoints included
    compile_s: dict[str, float]  # of which torch.compile, by part (COMPILE_TIMERS)
    epoch_seconds: list[float]  # every epoch, the first (compilation) included
    final_val_top1: float


def ours_throughput(arch: str, mode: str, data_root: Path, work: Path, args, train_images: int) -> Ours:
    config = bench_config(arch, mode, data_root, work, args, args.epochs)
    compiled_before, started = compile_seconds(), time.perf_counter()
    with timed_saves() as save_seconds:
        state = train(config)
    wall = time.perf_counter() - started
    images = train_images // args.batch_size * args.batch_size
    timed = timed_epochs(state.history, save_seconds)
    seconds = statistics.median(row["seconds"] for row, _ in timed)
    train_seconds = statistics.median(row["train_seconds"] for row, _ in timed)
    val_share = statistics.median(row["val_seconds"] / row["seconds"] for row, _ in timed)
    snapshot_share = statistics.median(save / row["seconds"] for row, save in timed)
    rest_share = statistics.median(1 - (row["train_seconds"] + row["val_seconds"]) / row["seconds"] for row, _ in timed)
    return Ours(images / seconds, images / train_seconds, val_share, snapshot_share, rest_share, wall,
                {part: seconds - compiled_before[part] for part, seconds in compile_seconds().items()},
                [row["seconds"] for row in state.history],
                state.history[-1]["val_top1"])


def timed_epochs(history: list[dict], save_seconds: list[float]) -> list[tuple[dict, float]]:
    """`(row, seconds of the checkpoint save within it)` of the epochs after the first, which pays for
    compilation and cudnn autotuning (the first alone if it is the only one). An epoch's seconds run
    from the previous row, so they hold the save that followed that row: one save a row."""
    if len(history) == 1:
        return [(history[0], 0.0)]
    return [(row, save_seconds[k - 1]) for k, row in enumerate(history) if k]


@contextmanager
def timed_saves():
    """The seconds of every `CheckpointSaver.save` call while in the block, in order: the time the
    training loop spends on the checkpoint (its snapshot; the write itself runs in the background)."""
    seconds: list[float] = []
    save = CheckpointSaver.save

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return save(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    CheckpointSaver.save = timed
    try:
        yield seconds
    finally:
        CheckpointSaver.save = save


# Dynamo's timers of what torch.compile costs a run (a private API). The backward graphs compile lazily,
# at the first backward, outside the forward's timer; Triton kernels with several launch configurations
# are benchmarked at their first run.
COMPILE_TIMERS = {"graphs": "_compile.compile_inner", "backward graphs": "backward._backward_impl",
                  "kernel autotuning": "CachingAutotuner.benchmark_all_configs"}


def compile_seconds() -> dict[str, float]:
    """Seconds torch.compile has spent in this process so far, by part (0 for a timer this torch
    version lacks; all 0 and the figure is left out)."""
    try:
        names, values = compile_times(repr="csv", aggregate=True)
    except (ValueError, TypeError):
        names, values = [], []
    totals = dict(zip(names, values))
    return {part: float(totals.get(timer, 0.0)) for part, timer in COMPILE_TIMERS.items()}


def ceiling_throughput(arch: str, mode: str, data_root: Path, work: Path, args, windows: int,
                       steps_per_window: int) -> tuple[float, float]:
    """The model alone: one fixed batch already on the device, same head, optimizer, precision and
    compile mode. The median over `windows` timed windows, so one slow window (another job on the
    machine) does not set the figure; and the windows' spread ((slowest - fastest) / median).

    The batch is the first augmented training batch of the same data, not random noise: under its
    power limit a GPU's speed depends on the values it multiplies (this workplace saw a bf16 matmul
    run 13% faster on zeros than on noise), and on an H100 resnet50's steps within ours once ran 13%
    faster than a ceiling measured on N(0, 1) noise. Real pixels did not close that gap entirely: on
    an H200 resnet50's steps still ran 4.7% faster than this ceiling, timed after 200 epochs."""
    config = bench_config(arch, mode, data_root, work, args, 1)
    runtime = make_runtime(config)
    seed_everything(0, False)
    _, train_source, _, _ = load_data(config, PreparedData.load(data_root), runtime)
    batches = train_source.batches(1)
    images, labels = next(batches)
    batches.close()
    model, optimizer, _, _ = build_model_and_optimizer(config, config.data.num_classes, runtime, steps_per_window)
    runner, _ = wrap_for_training(model, config, runtime)

    def step():
        with runtime.autocast():
            _, _, loss_logits = runner(images, labels)
        loss = F.cross_entropy(loss_logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    for _ in range(3):  # compilation, cuDNN autotuning, the allocator's first blocks
        step()
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    seconds = []
    for _ in range(windows):
        sync()
        started = time.perf_counter()
        for _ in range(steps_per_window):
            step()
        sync()
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return steps_per_window * args.batch_size / median, (max(seconds) - min(seconds)) / median


def unsteady_note(spread: float, ours_vs_ceiling: float, windows: int) -> str | None:
    """A note when the timings moved during the run (the ceiling's windows apart, or ours above the
    ceiling by more than UNSTEADY), whose ratios then mean little; else None."""
    if spread <= UNSTEADY and ours_vs_ceiling <= 1 + UNSTEADY:
        return None
    return (f"note: the ceiling's {windows} timing windows differed by {spread:.0%} and ours ran at "
            f"{ours_vs_ceiling:.0%} of it: the machine's speed changed during the run (another load, or a "
            "host that cannot keep up with the device); compare runs on an idle machine")


def profile_steps(arch: str, mode: str, data_root: Path, work: Path, args) -> None:
    """torch.profiler over one epoch of ours (training steps, then validation) after two warm-up
    epochs, with `train.py`'s own functions: the operators that take the most time and, on a GPU,
    the share of the epoch the GPU had work (kernels and copies): near 100% means the GPU sets the
    pace; less means the host does (launches, synchronisations). Profiling slows the host, so
    that share reads low rather than high."""
    config = bench_config(arch, mode, data_root, work, args, 3)
    runtime = make_runtime(config)
    seed_everything(0, False)
    classes, train_source, val_source, _ = load_data(config, PreparedData.load(data_root), runtime)
    model, optimizer, scheduler, scaler = build_model_and_optimizer(config, len(classes), runtime, len(train_source))
    train_runner, eval_runner = wrap_for_training(model, config, runtime)
    state, stop = RunState(), StopRequest()

    def epoch(number: int) -> None:
        state.step = 0
        train_one_epoch(train_runner, model, train_source, optimizer, scheduler, scaler, number, state, config,
                        runtime, stop).means(runtime)  # means() waits for the device
        evaluate(eval_runner, model, val_source, config, runtime).means(runtime)

    for number in (1, 2):  # compilation, autotuning
        epoch(number)
    cuda = runtime.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        epoch(3)
        wall = time.perf_counter() - started
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"profile of one epoch of ours, {arch} ({mode}), top {args.profile_rows} by {sort_by}:", flush=True)
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows), flush=True)
    if cuda:
        busy = _union_seconds(event.time_range for event in profiler.events() if event.device_type == DeviceType.CUDA)
        print(f"GPU busy {busy / wall:.1%} of the profiled epoch ({busy:.3f} of {wall:.3f} s)", flush=True)
    if args.profile_trace is not None:
        args.profile_trace.mkdir(parents=True, exist_ok=True)
        trace = args.profile_trace / f"{arch}_{mode}.json"
        profiler.export_chrome_trace(str(trace))
        print(f"wrote the profiled epoch's trace to {trace}", flush=True)


def _union_seconds(intervals) -> float:
    """Total length of the union of profiler time ranges (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for interval in sorted(intervals, key=lambda r: r.start):
        if interval.end > end:
            total += interval.end - max(interval.start, end)
            end = interval.end
    return total / 1e6


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure(arch: str, mode: str, naive: float | None, data_root: Path, work: Path, args,
            train_images: int) -> dict:
    """Ours and the ceiling for one model and compile mode, against `naive`: prints their lines (and,
    with --profile, a profiled epoch) and returns the JSON line's entry."""
    windows, steps_per_window = (5, 10) if args.device == "cuda" else (5, 1)
    ours = ours_throughput(arch, mode, data_root, work, args, train_images)
    ceiling, spread = ceiling_throughput(arch, mode, data_root, work, args, windows, steps_per_window)
    label = f"{arch} ({mode})" if len(args.compile_mode) > 1 else arch
    naive_text = f"naive {naive:8.1f} img/s | " if naive else ""
    print(f"{label:>9}: {naive_text}ours {ours.img_s:8.1f} img/s | ceiling {ceiling:8.1f} img/s | "
          f"ours/ceiling {ours.img_s / ceiling:.1%}"
          + (f" | ours/naive {ours.img_s / naive:.2f}x" if naive else ""), flush=True)
    # Where ours loses to the ceiling: the training steps themselves, validation, or the rest.
    print(f"{label:>9}: ours without validation {ours.steps_img_s:8.1f} img/s "
          f"({ours.steps_img_s / ceiling:.1%} of the ceiling); validation {ours.val_share:.1%} of "
          f"each epoch, checkpoint snapshot and the rest {ours.rest_share:.1%} (the snapshot "
          f"alone {ours.snapshot_share:.1%})", flush=True)
    compiled = sum(ours.compile_s.values())
    compiling = (f", torch.compile {compiled:.1f} s of it: " + ", ".join(
        f"{part} {seconds:.1f} s" for part, seconds in ours.compile_s.items())) if compiled else ""
    print(f"{label:>9}: {args.epochs} epochs of ours took {ours.wall_s:.1f} s in all (compilation, "
          f"cache and checkpoints included{compiling}); epochs (s): "
          + " ".join(f"{seconds:.3f}" for seconds in ours.epoch_seconds), flush=True)
    note = unsteady_note(spread, ours.img_s / ceiling, windows)
    if note:
        print(f"{label:>9}: {note}", flush=True)
    if args.profile:
        profile_steps(arch, mode, data_root, work, args)
    return {"arch": arch, "compile_mode": mode if args.compile else None,
            "device": device_name(args.device), "size": args.size,
            "naive_img_s": naive and round(naive, 1), "ours_img_s": round(ours.img_s, 1),
            "ceiling_img_s": round(ceiling, 1), "ceiling_spread": round(spread, 3),
            "ours_vs_ceiling": round(ours.img_s / ceiling, 3),
            "ours_vs_naive": naive and round(ours.img_s / naive, 2), "ours_epochs": args.epochs,
            "ours_steps_img_s": round(ours.steps_img_s, 1), "ours_val_share": round(ours.val_share, 3),
            "ours_snapshot_share": round(ours.snapshot_share, 3), "ours_rest_share": round(ours.rest_share, 3),
            "ours_wall_s": round(ours.wall_s, 1), "ours_compile_s": round(compiled, 1),
            "final_val_top1": round(ours.final_val_top1, 4)}


@command_main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile is None:
        args.compile = args.device == "cuda"
    if not args.compile and args.compile_mode != ["default"]:
        raise SystemExit("error: --compile-mode needs torch.compile (drop --no-compile)")
    with tempfile.TemporaryDirectory() as temp:
        work = args.work_dir or Path(temp)
        data_root = prepared_standin(work, args.individuals, args.images, round(args.size * 1.15))
        train_images = len(PreparedData.load(data_root).split("train"))
        if train_images < args.batch_size:
            raise SystemExit(f"error: --batch-size {args.batch_size} is larger than the {train_images} training "
                             "images of the stand-in data: raise --individuals or --images")
        print(f"device: {device_name(args.device)}; torch {torch.__version__}; {args.size} px, batch "
              f"{args.batch_size}, compile={args.compile}", flush=True)
        results = []
        for arch in args.arch:
            naive = naive_throughput(arch, data_root, args)
            modes = [measure(arch, mode, naive, data_root, work, args, train_images) for mode in args.compile_mode]
            if len(modes) > 1:
                best_ours, best_ceiling = max(r["ours_img_s"] for r in modes), max(r["ceiling_img_s"] for r in modes)
                print(f"{arch:>9}: best ours / best ceiling over the modes {best_ours / best_ceiling:.1%}", flush=True)
            results += modes
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
