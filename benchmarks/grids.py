"""Show it to a person: real client-domain images next to the generator's first and last samples.

    python -m benchmarks grids RUN_DIR [RUN_DIR ...]

For each run directory (written by ``fedmmkt run``), writes ``benchmarks/results/grid-<run name>.png``:
left, real images of the clients' evaluation split, one row per class; then the server's public
(pre-training) images of the same classes; then the generator's samples before any update
(``samples/round_000.png``) and after the last round, both on the run's fixed evaluation prompts and
seeds. The CAS of each is in the panel's title.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from .common import RESULTS


def grid_figure(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fedmmkt_plugins.evaluation.sample_grid import save_sample_grid
    from PIL import Image

    from fedmmkt_core.loading import load_server_data
    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.rundir import RunDirectory

    recipe = load_recipe(run_dir / "recipe.resolved.yaml", ["loggers=[]"])
    data = load_server_data(recipe)
    columns = int(recipe.algorithm.config.grid_columns)  # type: ignore[attr-defined]
    rows = RunDirectory(run_dir).read_metrics()
    samples = sorted((run_dir / "samples").glob("round_*.png"))
    if not samples or not rows:
        raise SystemExit(f"{run_dir}: no samples/round_*.png or metrics: run it with a generator first")
    panels: list[tuple[str, np.ndarray]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, images in (("clients' domain (real, evaluation split)", data.evaluation),
                              ("server's public data", data.public)):  # fmt: skip
            if images is None:
                continue
            path = Path(tmp) / "grid.png"
            save_sample_grid(path, images.images, images.labels, columns)
            panels.append((title, np.asarray(Image.open(path))))
    last = rows[-1]
    panels.append((f"generator before FedMMKT (CAS {last.get('generator_cas_initial', float('nan')):.2f})",
                   np.asarray(Image.open(samples[0]))))  # fmt: skip
    panels.append((f"after round {len(rows)} (CAS {last.get('generator_cas', float('nan')):.2f})",
                   np.asarray(Image.open(samples[-1]))))  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.4))
    for axis, (title, image) in zip(axes, panels, strict=True):
        axis.imshow(image, cmap="gray", vmin=0, vmax=255)
        axis.set_title(title, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks(range(16, image.shape[0], 34)[: len(data.task.class_names)], data.task.class_names,
                        fontsize=7)  # fmt: skip
    figure.suptitle(f"{recipe.name}: {recipe.algorithm.name}, seed {recipe.seed}", fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks grids", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        summary = run_dir / "summary.json"
        name = json.loads(summary.read_text())["name"] if summary.exists() else run_dir.name
        print(f"wrote {grid_figure(run_dir, RESULTS / f'grid-{name}.png')}")


if __name__ == "__main__":
    main()
