"""An exported folder is Hub-ready: a model card huggingface_hub parses (scores, recipe), a
results.json lm-eval's own table reads, the front plot, and push_to_hub up to the upload call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config's resolvers
    from evomerge.run import run_search

    run = tmp_path_factory.mktemp("card") / "run"
    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=["modelpool.size=tiny", "device=cpu", "search.max_evals=4", "algorithm=random", "algorithm.pop_size=2",
                                            "genome=modelwise_ta", "fitness.subset_size=8", "fitness.extra=[]", "report.html=false",
                                            "report.plots=false", "search.progress=false"])
    run_search(cfg, run, overrides=[])
    return run


def test_the_export_carries_a_model_card_and_lm_eval_results(run, tmp_path):
    from huggingface_hub import ModelCard
    from lm_eval.utils import make_table

    from evomerge.export import export_point

    out = export_point(run, "knee", tmp_path / "merged")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["merge", "evomerge"]
    assert card.data.base_model.endswith("tiny/base")
    results = {(r.dataset_name, r.dataset_split): r for r in card.data.eval_results}
    summary = json.loads((run / "summary.json").read_text())
    knee = summary["chosen"]["knee"]
    test = summary["test"]["knee"]["scores"]
    assert set(results) == {("toy_math", "validation"), ("toy_math", "test"), ("toy_lang", "validation"), ("toy_lang", "test")}
    assert results[("toy_math", "test")].metric_value == pytest.approx(test["math"], abs=1e-4)
    assert results[("toy_lang", "test")].metric_type == "acc"
    assert f"point {knee} of the run" in card.text and "## Recipe" in card.text and "merge_method: task_arithmetic" in card.text
    assert "Weight digests" in card.text and (out / "front.png").is_file()
    # lm-eval's own result-reading code accepts results.json (its table of the test split)
    lm = json.loads((out / "results.json").read_text())
    assert set(lm) >= {"results", "versions", "n-shot", "higher_is_better", "config"}
    table = make_table(lm)
    assert "toy_math" in table and "toy_lang" in table and "exact_match" in table
    assert lm["results"]["toy_lang"]["acc,none"] == pytest.approx(test["lang"])
    assert lm["config"]["split"] == "test" and lm["versions"]["toy_math"] == 1


def test_push_to_hub_calls_upload_folder_with_the_exported_folder(run, tmp_path, monkeypatch):
    """Everything up to the upload: no test can reach the Hub."""
    import huggingface_hub

    from evomerge.errors import ConfigError
    from evomerge.export import export_point

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)) or "https://hf.co/commit/x")
    out = export_point(run, "knee", tmp_path / "pushed", push_to_hub="me/my-merge")
    assert calls[0][0] == "create" and calls[0][1] == "me/my-merge"
    assert calls[1][0] == "upload" and calls[1][1]["repo_id"] == "me/my-merge" and Path(calls[1][1]["folder_path"]) == out
    assert (out / "README.md").is_file()
    with pytest.raises(ConfigError, match="push_to_hub must be a Hub repo id"):
        export_point(run, "knee", tmp_path / "never", push_to_hub="not a repo")
    assert not (tmp_path / "never").exists()

    def refuse(**kw):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub, "upload_folder", refuse)
    with pytest.raises(ConfigError, match="the upload failed .*401 Unauthorized.*upload it again later"):
        export_point(run, "knee", tmp_path / "later", push_to_hub="me/my-merge")
