"""A user's merge method, genome and algorithm from a separately installed package, found
through entry points (evomerge.methods, evomerge.configs) and used in a search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

METHODS = '''
from evomerge.merge.methods import LAMBDA, WEIGHT, MergeMethod, ParamSpec, _finish, register

def clipped_sum(g, p, out=None):
    weight = p["weight"].to(g.deltas.dtype)     # parameters arrive as float64 tensors
    merged = (weight[:, None] * g.deltas).clamp(-p["clip"], p["clip"]).sum(0)
    return _finish(g, merged, p, out)            # base + lambda * merged, into out

register(MergeMethod("clipped_sum", clipped_sum,
                     (WEIGHT, ParamSpec("clip", 0.0, 1.0, 0.1), LAMBDA), "sum of clipped task vectors"))
'''


def make_package(root: Path) -> Path:
    pkg = root / "my_merges"
    (pkg / "my_merges" / "configs" / "genome").mkdir(parents=True)
    (pkg / "my_merges" / "configs" / "algorithm").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "my-merges"
        version = "0.0.1"
        [project.entry-points."evomerge.methods"]
        mine = "my_merges.methods"
        [project.entry-points."evomerge.configs"]
        mine = "my_merges.configs"
        [tool.setuptools]
        packages = ["my_merges", "my_merges.configs"]
        [tool.setuptools.package-data]
        "my_merges.configs" = ["**/*.yaml"]
    '''))
    (pkg / "my_merges" / "__init__.py").write_text("")
    (pkg / "my_merges" / "methods.py").write_text(METHODS)
    (pkg / "my_merges" / "algo.py").write_text(textwrap.dedent('''
        from evomerge.search.algorithms import RandomStrategy

        class MyRandom(RandomStrategy):
            name = "my_random"

        def my_algo(pop_size: int = 4):
            return MyRandom(pop_size)
    '''))
    (pkg / "my_merges" / "configs" / "__init__.py").write_text("")
    (pkg / "my_merges" / "configs" / "genome" / "clipped.yaml").write_text(
        "methods: [clipped_sum]\nlayer_groups: 1\nsplit_attn_mlp: false\nseparate_embed_head: false\nsearch_lambda: false\nranges: {weight: [0.0, 1.0]}\n"
    )
    (pkg / "my_merges" / "configs" / "algorithm" / "my_algo.yaml").write_text("_target_: my_merges.algo.my_algo\n_partial_: true\npop_size: 2\n")
    return pkg


def test_a_method_genome_and_algorithm_from_an_installed_package(tmp_path):
    site = tmp_path / "site"
    pkg = make_package(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(pkg)],
                   check=True, capture_output=True, text=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge", "modelpool.size=tiny", "device=cpu", "genome=clipped", "algorithm=my_algo", "search.max_evals=2",
         "search.seed_with_references=false", "fitness.subset_size=4", "fitness.extra=[]", "fitness.test_rescore=false",
         "report.html=false", "report.plots=false", f"hydra.run.dir={run}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "search: my_random over" in proc.stderr and "methods clipped_sum" in proc.stderr
    records = [json.loads(line) for line in (run / "archive.jsonl").read_text().splitlines()]
    searched = [r for r in records if r["kind"] == "search"]
    assert len(searched) == 2 and all(g["method"] == "clipped_sum" for r in searched for g in r["recipe"]["groups"])
    assert all(r["error"] is None for r in searched)
    # without the package the same command names what is missing, in one line
    bare = subprocess.run([sys.executable, "-m", "evomerge", "modelpool.size=tiny", "genome=clipped", "search.max_evals=2"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bare.returncode != 0 and "clipped" in bare.stderr and "Traceback" not in bare.stderr


def test_a_method_computing_in_float64_still_merges_in_the_pools_dtype():
    """The docs' first example forgot the cast: the merger casts back instead of handing a
    float64 tensor to a float32 model."""
    import torch

    from evomerge.merge.groups import DeltaGroup
    from evomerge.merge.methods import MergeMethod, ParamSpec, WEIGHT, _finish, apply_method, register, REGISTRY

    def careless(g, p, out=None):
        return _finish(g, (p["weight"][:, None] * g.deltas).sum(0), p, out)

    if "careless_sum" not in REGISTRY:
        register(MergeMethod("careless_sum", careless, (WEIGHT, ParamSpec("lambda", 0.0, 2.0, 1.0)), "float64 on purpose"))
    group = DeltaGroup(base=torch.zeros(6), deltas=torch.ones(2, 6), segments=(6,))
    merged = apply_method("careless_sum", group, {"weight": [0.5, 0.25], "lambda": 1.0})
    assert merged.dtype == torch.float32 and torch.equal(merged, torch.full((6,), 0.75))
