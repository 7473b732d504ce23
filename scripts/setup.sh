#!/usr/bin/env bash
# Creates .venv (once) and installs requirements.txt into it, at the versions constraints.txt names.
# Run by the other scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "error: Python 3.11 or newer is needed; python3 is $(python3 --version 2>&1)" >&2; exit 1; }
  python3 -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # -qq: errors only. A machine's pip configuration can add dozens of warnings (index locations it
  # ignores) that would bury the demo's own output.
  .venv/bin/python -m pip install -qq --disable-pip-version-check -r requirements.txt -c constraints.txt
  echo "$want" > "$stamp"
fi
