#!/usr/bin/env bash
# The two quickstart commands (README.md):
#   bash run.sh          main job: set up .venv if needed, train YOLOv5 on the embedded `shapes`
#                        data, evaluate (JAX and exported ONNX), draw predictions, export .pt/.onnx
#   bash run.sh test     the test suite (what CI runs)
# And any registered network's main job on its embedded data, the same way:
#   bash run.sh <network>        (a network with a configs/<network>.py, e.g. yolov5)
# Extra arguments after `test` go to pytest; after the main job (or its network's name) they go to
# launch.py (e.g. --config.num_epochs=3).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ] || [ requirements.txt -nt .venv/.installed ]; then
  echo "== setting up .venv with $("$PY" --version) from requirements.txt"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  touch .venv/.installed
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# glibc malloc tunables for XLA's large per-step buffers (research/cpu/hostenv.py; launch.py sets them too)
TUNABLES=$(.venv/bin/python -m research.cpu.hostenv)
if [ -n "$TUNABLES" ]; then export GLIBC_TUNABLES="$TUNABLES"; fi

if [ "${1:-}" = "test" ]; then
  shift
  exec .venv/bin/python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider tests "$@"
fi

NETWORK=yolov5
if [ -n "${1:-}" ] && [ "${1#-}" = "$1" ]; then
  NETWORK=$1
  shift
  if [ ! -f "configs/$NETWORK.py" ]; then
    echo "run.sh: no network '$NETWORK' (configs/$NETWORK.py not found); networks: $(cd configs && ls [a-z]*.py | grep -v common | sed 's/\.py$//' | tr '\n' ' ')" >&2
    exit 2
  fi
fi
WORKDIR=${WORKDIR:-workdirs/${NETWORK}_main}
exec .venv/bin/python launch.py --config="configs/$NETWORK.py" --workdir="$WORKDIR" --mode=all "$@"
