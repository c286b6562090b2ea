"""Equal-weight merges on the toy zoo (validation subset): does the merge method matter when
the search cannot pick an expert corner? Needs a finished ``compare.py`` run directory.

    python experiments/methods/probe_symmetric.py   # prints one line per recipe
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from evomerge.merge.recipe import Group, Recipe
from evomerge.run import CONFIG_FILE
from evomerge.session import open_session

RUN = Path(__file__).resolve().parent / "runs" / "iso_c-s0"


def recipe(n_layers: int, layer_method: str, layer_params: dict, eh_method: str, eh_params: dict) -> Recipe:
    return Recipe(
        groups=[
            Group("embed", "embed", eh_method, dict(eh_params)),
            Group("layers", "layers", layer_method, dict(layer_params), layers=(0, n_layers - 1)),
            Group("head", "head", eh_method, dict(eh_params)),
        ]
    )


def main() -> None:
    session = open_session(OmegaConf.load(RUN / CONFIG_FILE), RUN)
    n = session.merger.n_layers
    half = {"weight": [0.5, 0.5]}
    probes = {
        "task_arithmetic w=0.5,0.5 everywhere": recipe(n, "task_arithmetic", half, "task_arithmetic", half),
        "task_arithmetic w=1,1 everywhere": recipe(n, "task_arithmetic", {"weight": [1, 1]}, "task_arithmetic", {"weight": [1, 1]}),
        "iso_c lambda 1 on layers, TA 0.5 embed/head": recipe(n, "iso_c", {"lambda": 1.0}, "task_arithmetic", half),
        "iso_c lambda 2 on layers, TA 0.5 embed/head": recipe(n, "iso_c", {"lambda": 2.0}, "task_arithmetic", half),
        "TA 0.5 on layers, iso_c lambda 1 embed/head": recipe(n, "task_arithmetic", half, "iso_c", {"lambda": 1.0}),
        "tsv_m w=1,1 on layers, TA 0.5 embed/head": recipe(n, "tsv_m", {"weight": [1, 1]}, "task_arithmetic", half),
    }
    for name, r in probes.items():
        session.merger.apply(r)
        print(f"{name:<48} {session.fitness()}", flush=True)


if __name__ == "__main__":
    main()
