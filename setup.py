"""Build of gradsieve's torch extension, gradsieve._C.

The source lists are the folders below (globbed, never listed by hand); CMakeLists.txt globs the
same folders. CUDA kernels are built when the installed torch is a CUDA build and nvcc is found
(CUDA_HOME); otherwise the CPU ops alone are built and the build says so. Set GRADSIEVE_CPU_ONLY=1
to skip CUDA, TORCH_CUDA_ARCH_LIST to choose the GPU targets (default "8.0;9.0"), MAX_JOBS for
parallel compilation (default 2).

The CPU ops split their work with at::parallel_for, which is inlined from torch's headers: compiled
without OpenMP it runs every loop on one thread. The C++ sources are therefore compiled and linked
with -fopenmp when torch's own parallel backend is OpenMP (the extension then needs libgomp.so.1,
which the loader resolves to the copy torch has already loaded: one OpenMP runtime, one thread
pool, one torch.set_num_threads). GRADSIEVE_NO_OPENMP=1 builds without it (single-threaded ops).

A compiler that ships only the static libstdc++ (libstdc++.a, no libstdc++.so; the GPU machines'
/opt/gcc is one) would copy the C++ runtime into the extension, and that private copy's locale
facets then crash torch's own stream code (a segfault inside every TORCH_CHECK message that prints
a number). The build then links the libstdc++.so.6 that torch itself runs with, and says so.
"""

import glob
import os
import subprocess
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCE_DIRS = ["csrc/ops", "csrc/cpu", "csrc/python"]
CUDA_SOURCE_DIRS = ["csrc/cuda", "csrc/cuda_launch"]


def sources_in(folders, patterns=("*.cpp", "*.cu")):
    found = []
    for folder in folders:
        for pattern in patterns:
            found.extend(sorted(glob.glob(os.path.join(folder, pattern))))
    return found


def cuda_build_reason():
    """Returns None when the CUDA kernels can be built, else why not."""
    if os.environ.get("GRADSIEVE_CPU_ONLY", "0") == "1":
        return "GRADSIEVE_CPU_ONLY=1"
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME)"
    return None


def shared_libstdcxx():
    """The libstdc++.so.6 this process (torch) runs with, when the C++ compiler has no shared
    libstdc++ of its own and would link the static one; None when it has one (the usual case)."""
    if not sys.platform.startswith("linux"):
        return None
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # the build itself will report a missing compiler
    if os.path.isabs(found):
        return None
    with open("/proc/self/maps") as maps:  # torch, imported above, has loaded it
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                return path
    raise SystemExit(f"gradsieve: {cxx} has no shared libstdc++ (it would link libstdc++.a into "
                     "the extension, which crashes torch) and none is loaded with torch; set CXX "
                     "to a compiler with libstdc++.so")


def openmp_flags():
    """The compile and link flags that make at::parallel_for parallel ([] when it cannot be)."""
    if os.environ.get("GRADSIEVE_NO_OPENMP", "0") == "1":
        print("gradsieve: GRADSIEVE_NO_OPENMP=1: the CPU ops run on one thread")
        return []
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        print("gradsieve: torch's parallel backend is not OpenMP; the CPU ops run on one thread")
        return []
    if not sys.platform.startswith("linux"):
        print("gradsieve: OpenMP flags are only set up for Linux; the CPU ops run on one thread")
        return []
    return ["-fopenmp"]


def make_extension():
    os.environ.setdefault("MAX_JOBS", "2")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    openmp = openmp_flags()
    cxx_flags = ["-O3", "-ffp-contract=off"] + openmp
    link_args = list(openmp)
    libstdcxx = shared_libstdcxx()
    if libstdcxx is not None:
        print(f"gradsieve: the compiler has only a static libstdc++; linking {libstdcxx}")
        link_args.append(libstdcxx)
    reason = cuda_build_reason()
    if reason is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"gradsieve: building CPU and CUDA ops (arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
        return cpp_extension.CUDAExtension(
            name="gradsieve._C",
            sources=sources_in(CPU_SOURCE_DIRS + CUDA_SOURCE_DIRS),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_args,
        )
    print(f"gradsieve: building the CPU ops only: {reason}")
    return cpp_extension.CppExtension(
        name="gradsieve._C",
        sources=sources_in(CPU_SOURCE_DIRS),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_args,
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
