#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: install, generate stand-in images in the
# real cvjena layout, prepare them exactly as the real dataset is prepared, and train
# configs/demo_standin.yaml on the CPU (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
if [ ! -f data/standin/annotations/prepared.json ]; then
  $py -m src.data.standin --out data/standin/raw --individuals 12 --images 40 --size 80 --seed 0
  $py -m src.data.prepare --raw-dir data/standin/raw --out-dir data/standin --min-images 10 --seed 0 --open-set-individuals 4
fi
exec $py -m src.training.train --config configs/demo_standin.yaml "$@"
