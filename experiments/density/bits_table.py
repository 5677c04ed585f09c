"""Bits per kept entry of every wire format (index x value codec) at densities 0.0005-0.05: the
whole payload's bits (header, index, scales, values) over the entries it carries, from
``gradsieve.wire.PayloadFormat`` itself. Buckets of DDP's default 25 MiB (6,553,600 fp32 entries)
unless ``--numel`` says otherwise; chunk 256.

    python experiments/density/bits_table.py [--numel N]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "python"))

from gradsieve.wire import INDEX_FORMATS, VALUE_CODECS, PayloadFormat  # noqa: E402

DENSITIES = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


def table(numel: int, chunk: int = 256) -> str:
    lines = [f"Bits per kept entry, all included, over a bucket of {numel:,} entries (chunk {chunk}):", "",
             "| index | values | " + " | ".join(str(d) for d in DENSITIES) + " |",
             "| --- | --- | " + " | ".join("---" for _ in DENSITIES) + " |"]
    for index in INDEX_FORMATS:
        for values in VALUE_CODECS:
            cells = []
            for density in DENSITIES:
                k = math.ceil(density * numel)
                fmt = PayloadFormat(k, values, min(chunk, k), index, numel)
                cells.append(f"{fmt.bits_per_entry:.1f}")
            lines.append(f"| {index} | {values} | " + " | ".join(cells) + " |")
    local = [PayloadFormat(math.ceil(d * numel), "fp32", 256, "local", numel).local for d in DENSITIES]
    lines += ["", "local index layout per density: " + ", ".join(
        f"{d}: " + ("bitmap" if lay.bitmap else f"b={lay.bits}") for d, lay in zip(DENSITIES, local))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=25 * 2**20 // 4)
    print(table(parser.parse_args().numel))


if __name__ == "__main__":
    main()
