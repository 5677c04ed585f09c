"""Declared, validated compressor options: each compressor lists what it accepts, with the type,
default, allowed range and meaning, so that a bad setting fails at construction with a message
naming the option, what is allowed and what was received."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Option:
    default: Any
    doc: str
    kind: type = float
    check: Optional[Callable[[Any], bool]] = None
    allowed: str = ""  # how the allowed values read in an error message
    choices: Optional[Sequence[Any]] = None

    def validate(self, owner: str, name: str, value: Any) -> Any:
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(
                    f"{owner}: option {name} must be one of {list(self.choices)}, got {value!r}"
                )
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: option {name} must be True or False, got {value!r}")
            return value
        if self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok and isinstance(value, float) and value.is_integer():
                value, ok = int(value), True
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        if not ok:
            raise ValueError(f"{owner}: option {name} must be a {self.kind.__name__}, got {value!r}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{owner}: option {name} must be {self.allowed}, got {value!r}")
        return value


def resolve(owner: str, declared: Mapping[str, Option], given: Mapping[str, Any]) -> Dict[str, Any]:
    """Defaults overlaid with the validated ``given`` options."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(
            f"{owner}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(declared))}"
        )
    return {
        name: spec.validate(owner, name, given[name]) if name in given else spec.default
        for name, spec in declared.items()
    }


def describe(declared: Mapping[str, Option]) -> str:
    """One line per option, for docs and ``--help``."""
    return "\n".join(f"  {name} (default {spec.default!r}): {spec.doc}" for name, spec in declared.items())
