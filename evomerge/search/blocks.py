"""Adaptive layer blocks: contiguous blocks of layers chosen from the task vectors.

A uniform split (``genome.layer_groups``) puts block borders where the layer count says,
not where the experts change. ``genome.blocks: adaptive`` instead cuts the layers into
``n_blocks`` contiguous blocks by an exact 1-D dynamic programme (as AP-BMM/BAMBO choose
their blocks): layers inside a block should look alike -- each expert's share of its task
vector per layer and the differences of those shares between experts -- and the blocks
should carry similar task-vector mass, so no block is all but empty. Pure numpy.
"""

from __future__ import annotations

import itertools

import numpy as np

from evomerge.errors import ConfigError


def layer_features(norms: np.ndarray) -> np.ndarray:
    """Per-layer features from the task-vector norms ``norms`` (layers x experts): each
    expert's share of its own task vector per layer, and the pairwise differences of those
    shares (where the experts disagree on which layers matter)."""
    norms = np.asarray(norms, dtype=float)
    if norms.ndim != 2 or len(norms) == 0:
        raise ValueError("norms must be a (layers x experts) array")
    totals = norms.sum(axis=0, keepdims=True)
    shares = np.divide(norms, totals, out=np.zeros_like(norms), where=totals > 0)
    diffs = [shares[:, i] - shares[:, j] for i, j in itertools.combinations(range(norms.shape[1]), 2)]
    return np.column_stack([shares, *diffs]) if diffs else shares


def block_cost(features: np.ndarray, mass: np.ndarray, n_blocks: int, balance: float = 1.0):
    """``cost(a, b)`` of making layers ``a..b`` (inclusive) one block: the within-block
    squared deviation of the (standardised) features plus ``balance`` times the squared
    deviation of the block's share of the mass from ``1 / n_blocks`` (scaled by the layer
    count, so both terms are per-layer sized)."""
    features = np.asarray(features, dtype=float)
    spread = float(((features - features.mean(axis=0)) ** 2).sum())
    if spread > 0:
        features = features / np.sqrt(spread / len(features))  # total SSE = number of layers
    mass = np.asarray(mass, dtype=float)
    share = mass / mass.sum() if mass.sum() > 0 else np.full(len(mass), 1.0 / len(mass))
    # prefix sums: SSE of any range in O(d)
    c1 = np.vstack([np.zeros(features.shape[1]), np.cumsum(features, axis=0)])
    c2 = np.concatenate([[0.0], np.cumsum((features**2).sum(axis=1))])
    cm = np.concatenate([[0.0], np.cumsum(share)])
    n = len(features)

    def cost(a: int, b: int) -> float:
        count = b - a + 1
        s1 = c1[b + 1] - c1[a]
        sse = (c2[b + 1] - c2[a]) - float(s1 @ s1) / count
        return max(sse, 0.0) + balance * n * (cm[b + 1] - cm[a] - 1.0 / n_blocks) ** 2

    return cost


def segment_layers(features: np.ndarray, mass: np.ndarray, n_blocks: int, balance: float = 1.0) -> list[tuple[int, int]]:
    """The contiguous blocks (inclusive layer ranges) of least total ``block_cost``: exact
    dynamic programme, O(n_blocks x layers^2). Ties go to the earliest border."""
    n = len(features)
    if not 1 <= n_blocks <= n:
        raise ConfigError(f"genome.n_blocks must be between 1 and the model's {n} layers, got {n_blocks}")
    cost = block_cost(features, mass, n_blocks, balance)
    inf = float("inf")
    # best[k][j]: least cost of cutting layers 0..j-1 into k blocks; cut[k][j]: start of the last block
    best = np.full((n_blocks + 1, n + 1), inf)
    cut = np.zeros((n_blocks + 1, n + 1), dtype=int)
    best[0][0] = 0.0
    for k in range(1, n_blocks + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = best[k - 1][i] + cost(i, j - 1)
                if value < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = value, i
    blocks, j = [], n
    for k in range(n_blocks, 0, -1):
        i = int(cut[k][j])
        blocks.append((i, j - 1))
        j = i
    return blocks[::-1]


def brute_force_segments(features: np.ndarray, mass: np.ndarray, n_blocks: int, balance: float = 1.0) -> tuple[list[tuple[int, int]], float]:
    """Every way of cutting the layers into ``n_blocks`` blocks, the cheapest (for tests)."""
    n = len(features)
    cost = block_cost(features, mass, n_blocks, balance)
    best: tuple[list[tuple[int, int]], float] = ([], float("inf"))
    for borders in itertools.combinations(range(1, n), n_blocks - 1):
        edges = (0, *borders, n)
        blocks = [(edges[i], edges[i + 1] - 1) for i in range(n_blocks)]
        total = sum(cost(a, b) for a, b in blocks)
        if total < best[1] - 1e-12:
            best = (blocks, total)
    return best


def total_cost(blocks: list[tuple[int, int]], features: np.ndarray, mass: np.ndarray, n_blocks: int, balance: float = 1.0) -> float:
    cost = block_cost(features, mass, n_blocks, balance)
    return sum(cost(a, b) for a, b in blocks)


def adaptive_blocks(norms: np.ndarray, n_blocks: int, balance: float = 1.0) -> list[tuple[int, int]]:
    """Blocks of layers from per-layer task-vector norms (layers x experts)."""
    norms = np.asarray(norms, dtype=float)
    return segment_layers(layer_features(norms), norms.sum(axis=1), n_blocks, balance)


# genes a search may have per evaluation of its budget: "well under the budget", so a model
# (a GP per objective) sees several evaluations per gene
GENES_PER_EVALUATION = 1 / 6
# the block count explains this share of the layer profile's spread (its elbow)
EXPLAINED_SHARE = 0.9


def segmentation_costs(norms: np.ndarray, max_blocks: int) -> list[float]:
    """Least within-block spread (standardised features, the balance term left out so counts
    compare) of the best segmentation into 1..``max_blocks`` blocks."""
    norms = np.asarray(norms, dtype=float)
    features = layer_features(norms)
    mass = norms.sum(axis=1)
    costs = []
    for k in range(1, max_blocks + 1):
        blocks = segment_layers(features, mass, k, balance=0.0)
        costs.append(total_cost(blocks, features, mass, k, balance=0.0))
    return costs


def auto_block_count(norms: np.ndarray, budget: int, explained: float = EXPLAINED_SHARE,
                     genes_per_evaluation: float = GENES_PER_EVALUATION) -> tuple[int, dict]:
    """``genome.n_blocks: auto``: the fewest blocks that explain ``explained`` of the spread of
    the experts' per-layer profile (the elbow of the segmentation's cost curve), never more
    blocks than layers nor more genes (blocks x experts) than ``genes_per_evaluation`` x the
    budget. Returns the count and how it was chosen (recorded in config.yaml)."""
    norms = np.asarray(norms, dtype=float)
    n_layers, n_experts = norms.shape
    by_budget = max(1, int(budget * genes_per_evaluation) // max(n_experts, 1))
    max_blocks = max(1, min(n_layers, by_budget))
    costs = segmentation_costs(norms, max_blocks)
    spread = costs[0]
    count = 1
    if spread > 1e-12:
        count = next((k for k, c in enumerate(costs, start=1) if 1.0 - c / spread >= explained - 1e-12), max_blocks)
    why = {
        "n_blocks": count,
        "max_blocks": max_blocks,
        "limited_by": "layers" if n_layers <= by_budget else "budget",
        "explained": [round(float(1.0 - c / spread), 4) if spread > 1e-12 else 1.0 for c in costs],
        "rule": f"fewest blocks explaining >= {explained:g} of the layer profile's spread; <= {genes_per_evaluation:.3g} genes per evaluation",
    }
    return count, why
