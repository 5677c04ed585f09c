"""The build links the shared C++ runtime: a private copy of libstdc++ inside the extension crashed
torch's stream code in every error message that printed a number (found on the H100 image, whose
compiler ships only libstdc++.a; benchmarks/RESULTS.md, CUDA section)."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

import gradsieve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and /proc are Linux")


@linux_only
def test_a_compiler_without_a_shared_libstdcxx_gets_torchs(tmp_path):
    # Answers -print-file-name as a gcc whose libstdc++.so is missing does: the bare name.
    fake = tmp_path / "fake-g++"
    fake.write_text('#!/bin/sh\necho "${1#-print-file-name=}"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "CXX": str(fake)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "static libstdc++" in line]
    assert len(lines) == 1, out.stdout
    path = lines[0].split("linking ", 1)[1]
    assert os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path)


@linux_only
def test_a_compiler_with_a_shared_libstdcxx_adds_nothing():
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler '{cxx}'")
    found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                           timeout=60).stdout.strip()
    if not os.path.isabs(found):
        pytest.skip(f"{cxx} has only a static libstdc++ (the other test covers it)")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "static libstdc++" not in out.stdout


@linux_only
@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_the_built_extension_needs_the_shared_libstdcxx():
    library = gradsieve._C.__file__
    listed = subprocess.run(["ldd", library], capture_output=True, text=True, timeout=60).stdout
    assert "libstdc++.so" in listed, listed


def test_an_error_message_with_a_number_raises_cleanly():
    # The crash itself: formatting the element count (a SymInt) inside TORCH_CHECK.
    import torch
    with pytest.raises(RuntimeError, match=r"k must be in \[0, 5\] \(the number of elements\), got -1"):
        gradsieve.topk_abs(torch.zeros(5), -1)
