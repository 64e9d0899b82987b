"""``python -m benchmarks NAME [options]``: run one benchmark; ``all`` runs every one, then ``readme``.

Benchmarks print their figures and write ``benchmarks/results/<name>-digits.json``; ``readme``
rewrites the README's results section from those files. ``python -m benchmarks NAME --help`` for
a benchmark's options.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "quality": "benchmarks.quality",
    "ablations": "benchmarks.ablations",
    "grids": "benchmarks.grids",
    "cost": "benchmarks.cost",
    "scale": "benchmarks.scale",
    "profile": "benchmarks.profile",
    "allocator": "benchmarks.allocator",
    "flower": "benchmarks.flower",
    "sd-shaped": "benchmarks.sd_shaped",
    "pretrain": "benchmarks.pretrain",
    "self-finetune": "benchmarks.self_finetune",
    "readme": "benchmarks.readme",
}
ALL = ["cost", "profile", "allocator", "scale", "flower", "quality", "readme"]  # quickest first; quality takes hours


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*BENCHMARKS, "all"):
        print(__doc__)
        print("benchmarks: " + ", ".join([*BENCHMARKS, "all"]))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    for name in ALL if argv[0] == "all" else [argv[0]]:
        print(f"== {name}", flush=True)
        importlib.import_module(BENCHMARKS[name]).main(argv[1:] if argv[0] != "all" else [])


if __name__ == "__main__":
    main(sys.argv[1:])
