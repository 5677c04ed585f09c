"""The compressor registry: a name -> class table filled by ``@register_compressor``.

Example::

    >>> import gradsieve
    >>> gradsieve.available_compressors()
    ['adaptive', 'bf16', 'dgc', 'ef21', 'fp16', 'none', 'regtopk', 'topk']
    >>> compressor = gradsieve.get_compressor("topk", density=0.01)
"""

from __future__ import annotations

from typing import Callable, Dict, List, Type, TypeVar

__all__ = ["available_compressors", "get_compressor", "register_compressor"]

_REGISTRY: Dict[str, type] = {}
C = TypeVar("C", bound=type)


def register_compressor(name: str) -> Callable[[C], C]:
    """Class decorator that makes a compressor available under ``name``."""

    def add(cls: C) -> C:
        if name in _REGISTRY:
            raise ValueError(f"register_compressor: the name {name!r} is taken by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_compressors() -> List[str]:
    """Registered compressor names, sorted."""
    return sorted(_REGISTRY)


def compressor_class(name: str) -> Type:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown compressor {name!r}; available: {', '.join(available_compressors())}"
        )
    return _REGISTRY[name]


def get_compressor(name: str, **options):
    """Builds the compressor registered as ``name`` with ``options``.

    Raises:
        ValueError: unknown name (the message lists the known ones), unknown option (lists the
            allowed ones), or an out-of-range value (says the allowed range).
    """
    return compressor_class(name)(**options)
