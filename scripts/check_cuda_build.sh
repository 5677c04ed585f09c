#!/usr/bin/env bash
# Proves that gradsieve's CUDA code compiles on a machine without a GPU (CI's case):
#   1. every csrc/cuda/*.cu file, with nvcc, for sm_80 and sm_90, through CMakeLists.txt;
#   2. every CUDA launcher (csrc/cuda_launch/*.cpp) against the installed torch's headers and the
#      CUDA toolkit, as a syntax check (a CPU-only torch cannot link them). A CPU-only torch wheel
#      lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h; a stand-in is made for it.
# Set PTXAS_VERBOSE=1 to print the register, shared-memory and spill report of every kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${CUDA_HOME:-}" ]; then CUDA_ROOT=$CUDA_HOME
elif [ -d /usr/local/cuda ]; then CUDA_ROOT=/usr/local/cuda
else CUDA_ROOT=$(cd "$(dirname "$(command -v nvcc)")/.." && pwd); fi
NVCC=${NVCC:-$CUDA_ROOT/bin/nvcc}
[ -x "$NVCC" ] || { echo "check_cuda_build: nvcc not found (set CUDA_HOME)" >&2; exit 1; }
BUILD=${GRADSIEVE_CUDA_CHECK_DIR:-build/cuda-check}
mkdir -p "$BUILD"

echo "check_cuda_build: compiling csrc/cuda/*.cu with $("$NVCC" --version | tail -n 1)"
cmake -S . -B "$BUILD" -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="80;90" \
  -DGRADSIEVE_PTXAS_VERBOSE="${PTXAS_VERBOSE:-OFF}" -DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON > "$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD" --target gradsieve_kernels -j "${MAX_JOBS:-2}"

PY=${PY:-.venv/bin/python}
echo "check_cuda_build: syntax check of csrc/cuda_launch/*.cpp against torch's headers"
includes=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
torch_include=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(include_paths()[0])")
if [ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
fi
for f in csrc/cuda_launch/*.cpp; do
  # shellcheck disable=SC2086
  g++ -std=c++20 -fsyntax-only -Wall -Werror=return-type $includes -I"$shim" -I"$CUDA_ROOT/include" \
    -Icsrc/include "$f"
  echo "  ok $f"
done
echo "check_cuda_build: all CUDA sources compile"
