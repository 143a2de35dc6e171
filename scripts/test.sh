#!/usr/bin/env bash
# Creates .venv (torch from the local wheels first, then vlray[dev]) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip stays quiet (-q), so each step says what it does and how long it took
step() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PY" -m venv .venv
fi
step "upgrading pip"
.venv/bin/pip install -q --upgrade pip
step "installing torch 2.14.1 + torchvision 0.29.1 (large; minutes on a first install)"
.venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
step "installing vlray[dev] with constraints.txt (ray, transformers, faiss, test tools)"
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
# tests/serve drives the web page with the system Chromium (never a downloaded browser). Install
# it where we can (root + apt-get); elsewhere that one test skips. VLRAY_NO_BROWSER=1: don't try.
if [ -z "${VLRAY_NO_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1 \
  && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium not installed: the web page test will skip" >&2
fi
step "environment ready; running the tests"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# two workers, each test file on one of them (module fixtures built once): 699 tests in 609 s
# instead of 868 s on 2 cores (2026-12-03)
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
