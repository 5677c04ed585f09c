"""Counts the places where gradsieve's code reads device memory on the host.

On a GPU such a read waits for the device's queue to drain; on the CPU nothing waits, but the
same Python calls are made, so counting them on the CPU shows where the hook would synchronise on
a GPU. :class:`HostReads` patches the tensor methods that read a tensor's values into Python
(``item``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``tolist``, ``cpu``, ``numpy``),
the ops whose output size depends on the values (``nonzero``, ``masked_select``, ``unique``) and
the CUDA synchronize calls, and records each call made from a frame of the gradsieve package
(the training harness, ``gradsieve.train``, excluded), with the gradsieve function that made it.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Dict, List, Tuple

import torch

import gradsieve

PACKAGE = os.path.dirname(os.path.abspath(gradsieve.__file__))
HARNESS = os.path.join(PACKAGE, "train")

TENSOR_METHODS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy",
                  "nonzero", "masked_select", "unique")
TORCH_FUNCTIONS = ("nonzero", "masked_select", "unique", "argwhere")


def _caller() -> Tuple[str, str, int]:
    """The innermost gradsieve frame on the stack (file, function, line), or ("", "", 0)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(PACKAGE + os.sep) and not path.startswith(HARNESS + os.sep):
            return os.path.relpath(path, PACKAGE), frame.f_code.co_name, frame.f_lineno
        frame = frame.f_back
    return "", "", 0


def _stack_functions() -> List[str]:
    names, frame = [], sys._getframe(2)
    while frame is not None:
        if os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE + os.sep):
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


class HostReads:
    """Context manager: ``reads`` lists ``(what, file, function, line, gradsieve functions on the
    stack)`` for every host read made from gradsieve's code while it is active."""

    def __init__(self) -> None:
        self.reads: List[Tuple[str, str, str, int, Tuple[str, ...]]] = []
        self._saved: Dict[Tuple[object, str], Tuple[object, bool]] = {}
        self._lock = threading.Lock()
        self._inside = threading.local()

    def _wrap(self, owner: object, name: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        self._saved[(owner, name)] = (original, name in vars(owner))
        detector = self

        def counted(*args, **kwargs):
            if not getattr(detector._inside, "busy", False):
                detector._inside.busy = True
                try:
                    where = _caller()
                    if where[0]:
                        with detector._lock:
                            detector.reads.append((name, *where, tuple(_stack_functions())))
                finally:
                    detector._inside.busy = False
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def __enter__(self) -> "HostReads":
        for name in TENSOR_METHODS:
            self._wrap(torch.Tensor, name)
        for name in TORCH_FUNCTIONS:
            self._wrap(torch, name)
        self._wrap(torch.cuda, "synchronize")
        self._wrap(torch.cuda.Event, "synchronize")
        self._wrap(torch.cuda.Stream, "synchronize")
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), (original, own) in self._saved.items():
            if own:
                setattr(owner, name, original)
            else:  # it was inherited: uncover it again
                delattr(owner, name)
        self._saved.clear()

    def count(self) -> int:
        with self._lock:
            return len(self.reads)
