"""What the benchmarks share: a prepared stand-in dataset, made once for each set of parameters, and
training that ends a benchmark in one line when it is stopped."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from src.config import Config
from src.data import prepare, standin
from src.training.resume import RunState
from src.training.stopping import TrainingStopped
from src.training.train import run

MIN_IMAGES = prepare.DEFAULT_MIN_IMAGES  # per individual, as the real data is prepared


def prepared_standin(work: Path, individuals: int, images: int, size: int, *, held_out: int = 0,
                     workers: int | None = None) -> Path:
    """`<work>/standin_<individuals>x<images>_<size>px_<held_out>out`, generated and prepared unless
    a previous run left it complete there (the parameters are in the name, so a run with others
    never reuses it). Exits with a message if either step fails (their errors are printed)."""
    root = work / f"standin_{individuals}x{images}_{size}px_{held_out}out"
    if not (root / "annotations" / "prepared.json").is_file():
        started = time.perf_counter()
        failed = standin.main(["--out", str(root / "raw"), "--individuals", str(individuals), "--images",
                               str(images), "--size", str(size), "--seed", "0"]
                              + (["--workers", str(workers)] if workers else []))
        failed = failed or prepare.main(["--raw-dir", str(root / "raw"), "--out-dir", str(root), "--min-images",
                                         str(MIN_IMAGES), "--seed", "0", "--open-set-individuals", str(held_out)])
        if failed:
            raise SystemExit("error: could not make the stand-in data (see above)")
        print(f"stand-in data: {individuals} x {images} images in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def train(config: Config) -> RunState:
    """`train.run`, where a run that training stops (Ctrl-C, SIGTERM, a non-finite loss) ends the
    benchmark with training's own line and exit code instead of a traceback."""
    try:
        return run(config)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
