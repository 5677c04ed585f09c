"""Registries: name -> class tables filled by a class decorator. The compressors' is filled by
``@register_compressor``; the exchanges' (:mod:`gradsieve.exchange`) by ``@register_exchange``.

Example::

    >>> import gradsieve
    >>> gradsieve.available_compressors()
    ['adaptive', 'bf16', 'dgc', 'ef21', 'fp16', 'granular', 'none', 'predictive', 'regtopk', 'topk']
    >>> compressor = gradsieve.get_compressor("topk", density=0.01)
"""

from __future__ import annotations

from typing import Callable, Dict, List, Type, TypeVar

__all__ = ["Registry", "available_compressors", "compressor_class", "get_compressor", "register_compressor"]

C = TypeVar("C", bound=type)


class Registry:
    """Classes by name, for one kind of thing (``kind`` names it in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: Dict[str, type] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator that makes a class available under ``name`` (and sets its ``name``)."""

        def add(cls: C) -> C:
            if name in self._classes:
                raise ValueError(f"register_{self.kind}: the name {name!r} is taken by "
                                 f"{self._classes[name].__name__}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return add

    def names(self) -> List[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def lookup(self, name: str) -> Type:
        """The class registered as ``name``; a ValueError listing the known names otherwise."""
        if not isinstance(name, str) or name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._classes[name]


_COMPRESSORS = Registry("compressor")


def register_compressor(name: str) -> Callable[[C], C]:
    """Class decorator that makes a compressor available under ``name``."""
    return _COMPRESSORS.register(name)


def available_compressors() -> List[str]:
    """Registered compressor names, sorted."""
    return _COMPRESSORS.names()


def compressor_class(name: str) -> Type:
    return _COMPRESSORS.lookup(name)


def get_compressor(name: str, **options):
    """Builds the compressor registered as ``name`` with ``options``.

    Raises:
        ValueError: unknown name (the message lists the known ones), unknown option (lists the
            allowed ones), or an out-of-range value (says the allowed range).
    """
    return compressor_class(name)(**options)
