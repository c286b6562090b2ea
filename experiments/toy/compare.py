"""NSGA-II over the layer-wise mixed-method genome vs. grid-searched task arithmetic vs.
random search, at equal evaluation budget, on the embedded toy zoo.

    python experiments/toy/compare.py            # runs what is missing, then compares
    python experiments/toy/compare.py --seeds 0 1 2

Runs go to experiments/toy/runs/<preset>-s<seed>; the comparison is `evomerge compare`
(printed before it runs), which writes compare.md, compare.png and compare.html here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESETS = {"nsga2 (layer-wise mixed)": "toy_nsga2", "grid (model-wise TA)": "toy_grid_ta", "random (layer-wise mixed)": "toy_random"}


def sh(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=144)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", type=Path, default=HERE / "runs")
    args = parser.parse_args()
    dirs = []
    for preset in PRESETS.values():
        for seed in args.seeds:
            run_dir = args.runs / f"{preset}-s{seed}"
            dirs.append(run_dir)
            if (run_dir / "summary.json").is_file():
                continue
            if (run_dir / "checkpoint.pkl").is_file():
                sh([sys.executable, "-m", "evomerge", f"resume={run_dir}"])
            else:
                sh([sys.executable, "-m", "evomerge", f"+experiment={preset}", f"search.max_evals={args.budget}", f"seed={seed}", f"hydra.run.dir={run_dir}"])
    labels = ",".join(f"'{name}'" for name in PRESETS)
    sh([sys.executable, "-m", "evomerge", "compare", f"runs=[{','.join(map(str, dirs))}]", f"budget={args.budget}", f"labels=[{labels}]", f"out={HERE}"])


if __name__ == "__main__":
    main()
