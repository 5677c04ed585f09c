"""What a failed worker's or node's output says went wrong, in a line (or gradsieve-train's own
report and the lines under it): what the launcher and the emulated cluster print when a rank
fails."""

from __future__ import annotations

import re

__all__ = ["ERROR_PREFIX", "error_line"]

# How gradsieve-train's own error reports start (argparse's and the launcher's).
ERROR_PREFIX = "gradsieve-train: error: "


def error_line(text: str) -> str:
    """What a worker's (or a node's) output says went wrong: gradsieve-train's own last error
    report when there is one ("gradsieve-train: error: ..." and the indented lines under it,
    without the prefix), else the last "SomeError: ..." line of the traceback (torch appends the
    frames of a failed future's callback after the message itself)."""
    raw = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    own = [i for i, line in enumerate(raw) if line.startswith(ERROR_PREFIX)]
    if own:
        said = [raw[own[-1]][len(ERROR_PREFIX):]]
        for line in raw[own[-1] + 1:]:
            if not line.startswith("  "):
                break
            said.append(line)
        return "\n".join(said)
    lines = [line.strip() for line in raw]
    said = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:?", line)]
    return (said or lines or [text])[-1]
