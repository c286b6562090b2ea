"""lm-eval tasks as a user writes them: a registry-style family (group + members that
``include:`` a template with ``!function`` helpers, local jsonl data), few-shot prompts,
lm-eval's own registry; every score equals ``lm_eval.simple_evaluate`` on the same model,
task, split and items."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evomerge.errors import ConfigError
from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness
from evomerge.estimators.tasks import GROUP, TAG, TASK, TaskCatalog, find_tasks, packaged_task_dir

DATA = packaged_task_dir() / "data"

TEMPLATE = """\
# shared by the family's members (as lm-eval's own task families are written)
dataset_path: json
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: !function utils.doc_to_text
doc_to_choice: "{{choices}}"
doc_to_target: label
num_fewshot: 3
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
"""

UTILS = """\
def doc_to_text(doc):
    return doc["question"].replace("L:", "L: ")


def variety(doc, results):
    # a graded score of the generated text (a random model never answers exactly)
    return {"variety": len(set(results[0])) / max(1, len(results[0]))}
"""


def _member(name: str) -> str:
    return f"""\
include: _fam_template.yaml
task: {name}
dataset_kwargs:
  data_files:
    train: data/{name}_train.jsonl
    validation: data/{name}_validation.jsonl
"""


GROUP_YAML = """\
group: fam
task: [fam_a, fam_b]
aggregate_metric_list:
  - {metric: acc, weight_by_size: true}
metadata: {version: 1.0}
"""

GEN = """\
task: fs_gen
dataset_path: json
dataset_kwargs:
  data_files: {train: data/math_train.jsonl, validation: data/math_validation.jsonl}
output_type: generate_until
training_split: train
validation_split: validation
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
num_fewshot: 2
target_delimiter: ""
generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks: 5}
process_results: !function utils.variety
metric_list:
  - {metric: variety, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
"""

LL = """\
task: fs_ll
dataset_path: json
dataset_kwargs:
  data_files: {train: data/math_train.jsonl, validation: data/math_validation.jsonl}
output_type: loglikelihood
training_split: train
validation_split: validation
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
num_fewshot: 2
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
"""


def _rows(source: str, start: int, n: int) -> str:
    lines = (DATA / source).read_text().splitlines()[start : start + n]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """A task folder as a user writes it: a group, two members including a template that
    uses ``!function``, a few-shot generation and a few-shot loglikelihood task."""
    root = tmp_path_factory.mktemp("my_tasks")
    (root / "data").mkdir()
    (root / "_fam_template.yaml").write_text(TEMPLATE)
    (root / "utils.py").write_text(UTILS)
    (root / "fam.yaml").write_text(GROUP_YAML)
    for name, train_from, val_from, n_val in (("fam_a", 0, 0, 10), ("fam_b", 16, 40, 14)):
        (root / f"{name}.yaml").write_text(_member(name))
        (root / "data" / f"{name}_train.jsonl").write_text(_rows("toy_lang_train.jsonl", train_from, 12))
        (root / "data" / f"{name}_validation.jsonl").write_text(_rows("toy_lang_validation.jsonl", val_from, n_val))
    (root / "data" / "math_train.jsonl").write_text(_rows("toy_math_train.jsonl", 0, 12))
    (root / "data" / "math_validation.jsonl").write_text(_rows("toy_math_validation.jsonl", 0, 12))
    (root / "fs_gen.yaml").write_text(GEN)
    (root / "fs_ll.yaml").write_text(LL)
    return root


@pytest.fixture(scope="module")
def math_model(tiny_models):
    """A random tiny Llama (conftest): its choices and generations vary from doc to doc,
    so scores built from different prompts differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["a"]))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_models["a"]))


OBJECTIVES = [
    FitnessTask("fam", "fam", "acc,none"),
    FitnessTask("fam_b", "fam_b", "acc,none"),
    FitnessTask("gen", "fs_gen", "variety,none"),
    FitnessTask("ppl", "fs_ll", "perplexity,none"),
    FitnessTask("greedy", "fs_ll", "acc,none"),
]


def simple_evaluate_scores(model, tokenizer, folder: Path, samples: dict[str, list[int]]) -> dict[str, float]:
    """The reference: lm-eval alone, as a user would run it from the task folder."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    results = simple_evaluate(
        model=lm,
        tasks=["fam", "fs_gen", "fs_ll"],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        samples=samples,
        bootstrap_iters=0,
        log_samples=False,
    )
    return {t.name: float(results["results"][t.task][t.metric]) for t in OBJECTIVES}


def test_family_and_fewshot_tasks_score_exactly_as_simple_evaluate(family, math_model, monkeypatch):
    model, tok = math_model
    fitness = LmEvalFitness(model, tok, OBJECTIVES, batch_size=16, include_paths=[family])
    assert sorted(fitness.task_objects) == ["fam_a", "fam_b", "fs_gen", "fs_ll"]
    assert fitness.task_objects["fam_a"].get_config("num_fewshot") == 3  # from the included template
    assert fitness.lm.max_length == model.config.max_position_embeddings  # the model's own window
    ours = fitness()
    assert ours.fidelity["fam"] == 24 and ours.fidelity["gen"] == 12

    monkeypatch.chdir(family)  # lm-eval alone resolves data files against the working directory
    full = {t: list(range(n)) for t, n in fitness.scorer.n_docs.items()}
    reference = simple_evaluate_scores(model, tok, family, full)
    assert dict(ours) == reference
    assert 0.0 < ours["fam"] < 1.0 and 0.0 < ours["gen"] < 1.0 and ours["ppl"] > 1.0  # scores that can differ

    # a subset is scored with the prompts simple_evaluate builds for that subset
    ids = {"fam_a": [1, 4, 7], "fam_b": [0, 2, 9, 13], "fs_gen": [3, 5, 6, 11], "fs_ll": [0, 8, 10]}
    sub = fitness.scores_from_items(fitness.score_items(ids))
    assert dict(sub) == simple_evaluate_scores(model, tok, family, ids)
    assert dict(fitness.scores_from_items(fitness.score_items(full))) == reference  # and back


def test_group_score_is_lm_evals_size_weighted_aggregate(family, math_model):
    model, tok = math_model
    fitness = LmEvalFitness(model, tok, [FitnessTask("a", "fam_a", "acc,none"), FitnessTask("b", "fam_b", "acc,none"), FitnessTask("fam", "fam", "acc,none")],
                            batch_size=16, include_paths=[family])
    s = fitness()
    assert s["fam"] == pytest.approx((10 * s["a"] + 14 * s["b"]) / 24, abs=1e-12)
    assert s.fidelity["fam"] == 24


def test_truncated_prompts_are_warned_once(family, math_model, caplog):
    model, tok = math_model
    fitness = LmEvalFitness(model, tok, [FitnessTask("gen", "fs_gen", "variety,none")], batch_size=16, max_length=16, include_paths=[family])
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        fitness()
        fitness()
    warnings = [r.getMessage() for r in caplog.records if "cut on the left" in r.getMessage()]
    assert len(warnings) == 1 and "fs_gen" in warnings[0] and "max_length=16" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        LmEvalFitness(model, tok, [FitnessTask("gen", "fs_gen", "variety,none")], batch_size=16, include_paths=[family])()
    assert not [r for r in caplog.records if "cut on the left" in r.getMessage()]


def test_catalog_definitions_kinds_and_files(family):
    found = find_tasks(["fam", "fam_a", "fs_gen"], [family])
    assert found["fam"].kind == GROUP and found["fam"].members == ("fam_a", "fam_b")
    a = found["fam_a"]
    assert a.kind == TASK and a.custom_tags and a.config["output_type"] == "multiple_choice"  # from the include
    names = {p.name for p in a.files}
    assert {"fam_a.yaml", "_fam_template.yaml", "utils.py", "fam_a_train.jsonl", "fam_a_validation.jsonl"} <= names
    assert {"fam_b.yaml", "utils.py"} <= {p.name for p in found["fam"].files}
    cfg = a.for_split("validation")
    assert callable(cfg["doc_to_text"]) and Path(cfg["dataset_kwargs"]["data_files"]["train"]).is_absolute()
    with pytest.raises(ConfigError, match=r"fitness task 'fam_a' has no split named 'test' \(it has: train, validation\)"):
        a.for_split("test")


def test_names_fall_back_to_the_registry_and_user_folders_win(family, tmp_path):
    registry = tmp_path / "registry"
    (registry / "reg").mkdir(parents=True)
    (registry / "reg" / "reg_task.yaml").write_text(GEN.replace("task: fs_gen", "task: reg_task\ntag: reg_tag"))
    (registry / "reg" / "fs_ll.yaml").write_text(GEN.replace("task: fs_gen", "task: fs_ll"))  # shadowed by the user's
    catalog = TaskCatalog([family], registry_root=registry)
    assert not catalog.with_registry
    catalog.find(["fs_gen"])
    assert not catalog.with_registry  # the registry is only scanned for names not found locally
    found = catalog.find(["reg_task", "fs_ll", "reg_tag"])
    assert catalog.with_registry and found["reg_task"].from_registry
    assert not found["fs_ll"].from_registry and found["fs_ll"].config["output_type"] == "loglikelihood"
    assert found["reg_tag"].kind == TAG and found["reg_tag"].members == ("reg_task",)
    with pytest.raises(ConfigError, match="fitness task 'nope' not found in .* nor in lm-eval's task registry"):
        catalog.find(["nope"])


def _cfg(folder: Path, objectives: list[dict], **fitness) -> OmegaConf:
    return OmegaConf.create({"fitness": {"objectives": objectives, "extra": [], "include_paths": [str(folder)], "split": "validation", **fitness}})


def test_check_tasks_groups_tags_and_splits(family, tmp_path):
    from evomerge.checks import check_tasks

    files = check_tasks(_cfg(family, [{"name": "fam", "task": "fam", "metric": "acc,none"}], test_rescore=False))
    assert {"fam.yaml", "fam_a.yaml", "fam_b.yaml", "_fam_template.yaml", "utils.py"} <= {p.name for p in files["fam"]}
    with pytest.raises(ConfigError, match=r"fitness task 'fam_a' has no split named 'test', needed by the final re-score .* fitness.test_rescore=false"):
        check_tasks(_cfg(family, [{"name": "fam", "task": "fam", "metric": "acc,none"}], test_rescore=True))
    (family / "nogroup.yaml").write_text("group: nogroup\ntask: [fam_a]\n")
    try:
        with pytest.raises(ConfigError, match="'nogroup' is a group without aggregate_metric_list.*fam_a"):
            check_tasks(_cfg(family, [{"name": "g", "task": "nogroup", "metric": "acc,none"}], test_rescore=False))
    finally:
        (family / "nogroup.yaml").unlink()


def test_unloadable_local_data_is_one_line(tmp_path, math_model):
    model, tok = math_model
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "math_train.jsonl").write_text("not json\n")
    (tmp_path / "data" / "math_validation.jsonl").write_text("not json\n")
    (tmp_path / "fs_gen.yaml").write_text(GEN)
    with pytest.raises(ConfigError, match=r"fitness task 'fs_gen' \(.*fs_gen.yaml\): lm-eval could not read it \(ImportError"):
        LmEvalFitness(model, tok, [FitnessTask("gen", "fs_gen", "variety,none")], include_paths=[tmp_path])  # no utils.py
    (tmp_path / "utils.py").write_text(UTILS)
    with pytest.raises(ConfigError) as err:
        LmEvalFitness(model, tok, [FitnessTask("gen", "fs_gen", "variety,none")], include_paths=[tmp_path])
    assert str(err.value).startswith("fitness task 'fs_gen': its dataset 'json' could not be loaded")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_registry_names_resolve_and_an_offline_hub_dataset_is_one_line(math_model, monkeypatch, tmp_path):
    """lm-eval's own registry (scanned once, ~20 s): tasks, tags and groups resolve; a Hub
    dataset that is not cached, in offline mode, is one line naming the task and the fix."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    catalog = TaskCatalog()
    found = catalog.find(["arc_easy", "ai2_arc", "mmlu"])
    assert found["arc_easy"].kind == TASK and found["arc_easy"].from_registry
    assert found["arc_easy"].config["dataset_path"] == "allenai/ai2_arc"
    assert found["ai2_arc"].kind == TAG and "arc_easy" in found["ai2_arc"].members
    assert found["mmlu"].kind == GROUP and len(found["mmlu"].members) >= 50 and "mmlu_anatomy" in found["mmlu"].members
    model, tok = math_model
    with pytest.raises(ConfigError) as err:
        LmEvalFitness(model, tok, [FitnessTask("arc", "arc_easy", "acc,none")])
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("fitness task 'arc_easy': its dataset 'allenai/ai2_arc' could not be loaded")
    assert "HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set" in line and "unset them" in line


def test_offline_mode_is_left_to_the_user(monkeypatch):
    from evomerge.estimators.lm_eval_fitness import quiet_libraries

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    quiet_libraries()
    import os

    assert "HF_DATASETS_OFFLINE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ


def test_own_models_get_no_toy_fitness():
    """modelpool=paths selects fitness/paths.yaml: no objectives, no extras, the model's
    max_length; a run without objectives is one line saying what to write."""
    from test_configs_algorithms import composed

    from evomerge.session import check_objectives

    toy = composed([])
    assert [o.task for o in toy.fitness.objectives] == ["toy_math", "toy_lang"] and toy.fitness.max_length == 64
    own = composed(["modelpool=paths"])
    assert list(own.fitness.objectives) == [] and list(own.fitness.extra) == [] and own.fitness.max_length is None
    with pytest.raises(ConfigError, match=r"fitness.objectives must list at least one task -- your models need your tasks, e.g. fitness.objectives="):
        check_objectives(own)
    assert [o.task for o in composed(["modelpool=paths", "fitness=toy"]).fitness.objectives] == ["toy_math", "toy_lang"]


def test_item_model_estimators_refuse_group_objectives(family, math_model):
    from evomerge.estimators.lm_eval_fitness import require_single_tasks

    model, tok = math_model
    fitness = LmEvalFitness(model, tok, [FitnessTask("fam", "fam", "acc,none")], include_paths=[family])
    with pytest.raises(ConfigError, match="the IRT estimator needs one task per objective; 'fam' is a group"):
        require_single_tasks(fitness, "IRT")
    require_single_tasks(LmEvalFitness(model, tok, [FitnessTask("a", "fam_a", "acc,none")], include_paths=[family]), "IRT")


def test_a_one_member_group_overrides_num_fewshot(family, math_model, tmp_path):
    """The docs' recipe for another shot count of a task one cannot edit (e.g. a registry task)."""
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "ll_1shot.yaml").write_text("group: ll_1shot\ntask:\n  - {task: fs_ll, num_fewshot: 1}\naggregate_metric_list:\n  - {metric: acc}\n")
    model, tok = math_model
    fitness = LmEvalFitness(model, tok, [FitnessTask("ll", "ll_1shot", "acc,none")], include_paths=[family, wrapper])
    assert fitness.task_objects["fs_ll"].get_config("num_fewshot") == 1
    first = fitness.scorer._instances_for("fs_ll", [3])[3][0].args[0]
    assert first.count("\n\n") == 1  # one example, then the question
