"""``evomerge export ... verify=true``: run mergekit on the exported recipe's YAML and compare
its weights with the exported HF folder, tensor by tensor, in one line."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from evomerge.errors import ConfigError, MergeError
from evomerge.merge.methods import get_method
from evomerge.merge.recipe import Recipe

# float32 merges agree to float rounding; a bfloat16/float16 export is rounded once more
RTOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
ATOL = 1e-6


@dataclass(frozen=True)
class Verification:
    tensors: int
    max_abs_diff: float
    beyond: int  # elements beyond tolerance
    random: bool  # random method: masks differ by design

    @property
    def same(self) -> bool:
        return self.beyond == 0

    def line(self) -> str:
        verdict = "same weights as mergekit 0.1.5" if self.same else "DIFFERS from mergekit 0.1.5"
        why = " (random method: drop masks differ by design)" if self.random and not self.same else ""
        return f"verify: {self.tensors} tensors, max abs diff {self.max_abs_diff:.3g}, {self.beyond} elements beyond tolerance: {verdict}{why}"


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise ConfigError(f"{folder} holds no .safetensors weights to verify")
    return tensors


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], random: bool = False) -> Verification:
    """Tensor-by-tensor comparison (names both sides have; a missing name counts as differing)."""
    max_diff, beyond = 0.0, 0
    for name, value in ours.items():
        if name not in theirs:
            beyond += value.numel()
            continue
        a, b = value.double(), theirs[name].double()
        diff = (a - b).abs()
        tol = ATOL + RTOL.get(value.dtype, 1e-5) * b.abs()
        max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
        beyond += int((diff > tol).sum())
    beyond += sum(theirs[n].numel() for n in set(theirs) - set(ours))
    return Verification(len(ours), max_diff, beyond, random)


def mergekit_yaml_text(recipe: Recipe, base: str, experts: list[str], verified: Verification | None = None, dtype: str = "float32") -> str:
    """The YAML a user would hand to ``mergekit-yaml`` (a one-line error where it cannot be
    written); with ``verified``, one header line saying what the verification found instead of
    the export's "not verified here"."""
    try:
        text = recipe.to_mergekit_yaml(base=base, experts=experts, dtype=dtype)
    except MergeError as exc:
        raise ConfigError(f"cannot verify: {exc}") from None
    if verified is None:
        return text
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return f"# exported by evomerge; verified here: {verified.line()}\n{body}\n"


def require_mergekit() -> None:
    try:
        import mergekit.merge  # noqa: F401
    except ImportError:
        raise ConfigError("verify=true needs mergekit (pip install mergekit==0.1.5); nothing was exported") from None


def verify_export(folder: Path, recipe: Recipe, base: str, experts: list[str], dtype: str = "float32") -> Verification:
    """Run mergekit (in-process, on the CPU) on ``recipe``'s YAML (merged in ``dtype``, the
    pool's) and compare with ``folder``."""
    require_mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = mergekit_yaml_text(recipe, base, experts, dtype=dtype)
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    with tempfile.TemporaryDirectory(prefix="evomerge-verify-") as tmp:
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False)
        run_merge(config, tmp, options)
        theirs = load_folder(Path(tmp))
    random = any((spec := get_method(g.method).mergekit) is not None and spec.random for g in recipe.groups)
    return compare(load_folder(folder), theirs, random)
