#!/usr/bin/env bash
# Set up bayescal in ./.venv: a CPU build of torch where no GPU is present, then the
# package with its test extra and, where it installs, the neml2 extra. Safe to run again; it
# reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    python -m pip install --quiet "torch>=2.4,<3"
  else
    # 2.13.0 is the CPU build these machines keep on disk (an unpinned torch is a CUDA build).
    python -m pip install --quiet torch==2.13.0
  fi
fi
# The neml2 extra (the NEML2 backend) ships wheels for CPython 3.11 on manylinux; where it
# cannot install, the core installs without it and the NEML2 tests skip.
if ! python -m pip install --quiet -e ".[dev,neml2]"; then
  echo "setup.sh: the neml2 extra did not install; installing without it (NEML2 tests will skip)" >&2
  python -m pip install --quiet -e ".[dev]"
fi
