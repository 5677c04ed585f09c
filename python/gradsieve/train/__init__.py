"""The training harness behind ``gradsieve-train``: workloads, launcher, emulated links, reports.

A user of the library, not part of it: it needs the ``train`` extra (``pip install -e ".[train]"``:
tqdm, matplotlib, scikit-learn), which ``import gradsieve`` never imports.
"""

from gradsieve.train.cli import main

__all__ = ["main"]
