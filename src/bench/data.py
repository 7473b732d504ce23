"""The benchmarks' data: a prepared stand-in dataset, made once for each set of parameters."""
from __future__ import annotations

import time
from pathlib import Path

from src.data import prepare, standin

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
            raise SystemExit("could not make the stand-in data (see above)")
        print(f"stand-in data: {individuals} x {images} images in {time.perf_counter() - started:.0f} s", flush=True)
    return root
