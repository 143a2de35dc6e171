#!/usr/bin/env bash
# Creates .venv (torch from the local wheels first, then vlray) and runs the offline demo job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
.venv/bin/python jobs/embed.py "$@"
.venv/bin/python jobs/query.py --index vlray-demo-output/index --text "a photo of a cat" -k 5
