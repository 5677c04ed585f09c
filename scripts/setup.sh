#!/usr/bin/env bash
# Set-up for a fresh clone, run by both README commands: a virtual environment in .venv (seeing a
# torch that is already installed system-wide, e.g. a CUDA build on a GPU machine), torch if it is
# missing (GRADSIEVE_TORCH, default torch==2.13.0), the build and test tools (requirements.txt), and
# gradsieve itself with the training harness's extra (pip install -e ".[train]": the build of the
# extension, skipped when the built library is newer than every source and the extra is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${GRADSIEVE_TORCH:-torch==2.13.0}"
  python -m pip install -q "${GRADSIEVE_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -r requirements.txt

built=$(ls python/gradsieve/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$built" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$built" -type f | head -n 1)" ] \
    && python -c "import gradsieve, gradsieve.train" >/dev/null 2>&1; then
  echo "setup: gradsieve is built and up to date"
else
  echo "setup: building gradsieve (a few minutes on 2 cores)"
  if ! python -m pip install -v --no-build-isolation -e ".[train]" > .venv/build.log 2>&1; then
    tail -n 60 .venv/build.log
    echo "setup: the build failed; the whole log is in .venv/build.log" >&2
    exit 1
  fi
  grep -E "^gradsieve: building" .venv/build.log | head -n 1 || true
fi
python -c "import gradsieve, torch; print(f'setup: gradsieve {gradsieve.__version__} on torch {torch.__version__}, CUDA kernels built: {gradsieve.cuda_kernels_built()}')"
