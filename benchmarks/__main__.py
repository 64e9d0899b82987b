"""``python -m benchmarks <name> [options]``: run one benchmark, or ``all`` of them, then the README table."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "quality": "benchmarks.quality",
    "cost": "benchmarks.cost",
    "scale": "benchmarks.scale",
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print(__doc__)
        print("benchmarks: " + ", ".join(BENCHMARKS))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
