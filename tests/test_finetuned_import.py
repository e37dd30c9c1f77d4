"""Published fine-tuned checkpoints as task models (models.<name>.finetuned) and tasks without data of
the suite (instruct, code) scored by lm-eval tasks by name (evaluate.harness_scoring).

Unit tests of methods/io/published.py and of the start-up checks (dry runs that stop naming the bad
key), and one end-to-end run: a tiny local base Llama and two "published" fine-tunes of it with one
added vocabulary row (as WizardLM's [PAD]), imported, the base resized (vocab_rule resize-base),
pruned, merged and evaluated, one task scored through a custom lm-eval task by name. Offline; no
../shared needed.
"""

import json
import re

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_snakemake
from methods.evaluate.harness import harness_score, named_task_primary, task_config
from methods.io.checkpoint import checkpoint_hash, load_state_dict, read_json
from methods.io.published import (PublishedCheckpointError, check_vocabulary, fetch, materialize,
                                  resize_base_vocabulary)
from methods.prune.apply import prune_state_dict
from methods.tasks import get_task
from methods.zoo.models import build_decoder, build_decoder_tokenizer
from methods.zoo.tasks import generate_task

MAX_LENGTH = 48


def _base(path, seed: int = 0):
    """A tiny zoo-tokenizer Llama saved with save_pretrained (a "hub" base, here a local directory)."""
    torch.manual_seed(seed)
    tokenizer = build_decoder_tokenizer(MAX_LENGTH)
    model = build_decoder(tokenizer, 16, 1, 2, 32, MAX_LENGTH)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _published(base_dir, path, seed: int, extra_token: str | None = "[PAD2]", safetensors: bool = True):
    """A "published fine-tune" of the base: every weight moved a little, and (as WizardLM's [PAD])
    one added vocabulary row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.01 * torch.randn(weight.shape, generator=generator))
    if extra_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [extra_token]})
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(path, safe_serialization=safetensors) if safetensors else _save_pickle(model, path)
    tokenizer.save_pretrained(path)
    return model


def _save_pickle(model, path):
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")


# -- methods/io/published.py ---------------------------------------------------------------------------
def test_local_safetensors_are_linked_and_pickles_converted(tmp_path):
    base_dir = tmp_path / "base"
    _base(base_dir)
    linked_src, pickled_src = tmp_path / "pub-st", tmp_path / "pub-bin"
    _published(base_dir, linked_src, seed=1)
    model = _published(base_dir, pickled_src, seed=1, safetensors=False)

    source, info = fetch({"source": "local", "path": str(linked_src)}, "models.m.finetuned.t")
    assert info == {"source": "local", "path": str(linked_src.resolve())}
    out = tmp_path / "out-st"
    out.mkdir()
    done = materialize(source, out)
    assert done["weights"] == "linked" and (out / "model.safetensors").is_symlink()
    assert checkpoint_hash(out) == checkpoint_hash(linked_src)

    out = tmp_path / "out-bin"
    out.mkdir()
    done = materialize(fetch({"source": "local", "path": str(pickled_src)}, "w")[0], out)
    assert done["weights"] == "converted" and not (out / "pytorch_model.bin").exists()
    converted = load_file(out / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(converted[name], tensor), name


def test_local_source_without_config_is_refused_naming_the_key(tmp_path):
    with pytest.raises(PublishedCheckpointError, match=r"models\.m\.finetuned\.code\.path: .* \(no config\.json"):
        fetch({"source": "local", "path": str(tmp_path)}, "models.m.finetuned.code")


def test_hub_id_missing_from_the_offline_cache_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PublishedCheckpointError, match=r"models\.m\.finetuned\.gsm8k\.id: cannot fetch"):
        fetch({"source": "hub", "id": "no-such-org/no-such-model-dcbench"}, "models.m.finetuned.gsm8k")


def test_vocabulary_rules():
    check_vocabulary(32000, 32000, "strict", "models.m.finetuned.gsm8k", "models.m")
    check_vocabulary(32000, 32001, "resize-base", "models.m.finetuned.gsm8k", "models.m")
    with pytest.raises(PublishedCheckpointError, match=r"models\.m\.finetuned\.gsm8k: the checkpoint has 32001 "
                                                       r"vocabulary rows, the base 32000.*models\.m\.vocab_rule: resize-base"):
        check_vocabulary(32000, 32001, "strict", "models.m.finetuned.gsm8k", "models.m")
    with pytest.raises(PublishedCheckpointError, match="fewer than the base's"):
        check_vocabulary(32000, 31999, "resize-base", "models.m.finetuned.gsm8k", "models.m")


def test_single_model_dare_with_unequal_vocabulary_rows_is_a_clear_error(tmp_path):
    """What vocab_rule strict protects against: a delta over unequal embedding shapes."""
    base = {"model.embed_tokens.weight": torch.zeros(4, 2)}
    finetuned = {"model.embed_tokens.weight": torch.ones(5, 2)}
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight': base shape \(4, 2\) differs"):
        prune_state_dict(base, finetuned, "dare", {"drop_rate": 0.5}, 0, [])


def test_resized_base_gets_mean_rows_and_matches_the_published_shapes(tmp_path):
    base_dir = tmp_path / "base"
    base_model, _ = _base(base_dir)
    refs = {}
    for i, task in enumerate(("zoo-review", "code")):
        refs[task] = tmp_path / task
        _published(base_dir, refs[task], seed=i + 1)
    out = tmp_path / "resized"
    out.mkdir()
    info = resize_base_vocabulary(str(base_dir), refs, out, "models.m")
    rows = len(build_decoder_tokenizer(MAX_LENGTH))
    assert info["rows"] == [rows, rows + 1] and info["tokenizer_from"] == "code"
    resized, published = load_state_dict(out), load_state_dict(refs["code"])
    original = base_model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert resized[name].shape == published[name].shape
        assert torch.equal(resized[name][:rows], original[name])
        assert torch.allclose(resized[name][rows], original[name].mean(dim=0))
    # unequal published vocabularies cannot share one resized base
    _published(refs["code"], tmp_path / "bigger", seed=3, extra_token="[PAD3]")
    with pytest.raises(PublishedCheckpointError, match=r"models\.m\.finetuned: vocab_rule resize-base needs one"):
        resize_base_vocabulary(str(base_dir), {"a": refs["code"], "b": tmp_path / "bigger"}, tmp_path / "x", "models.m")


def test_harness_score_means_headline_metrics_and_refuses_unbounded_ones():
    named = {"humaneval": {"pass@1_create_test": 0.25, "pass@1_create_test_stderr": 0.01},
             "mbpp": {"pass_at_1": 0.35}, "ifeval": {"prompt_level_strict_acc": 0.4, "inst_level_strict_acc": 0.5},
             "wikitext": {"word_perplexity": 12.0, "bits_per_byte": 0.7}}
    assert named_task_primary(named["humaneval"]) == "pass@1_create_test"
    assert named_task_primary(named["ifeval"]) == "prompt_level_strict_acc"
    assert harness_score(named, ["humaneval", "mbpp"], "evaluate.harness_scoring.code") == {"score": pytest.approx(0.3)}
    with pytest.raises(ValueError, match=r"evaluate\.harness_scoring\.code: lm-eval task 'wikitext'"):
        harness_score(named, ["humaneval", "wikitext"], "evaluate.harness_scoring.code")


# -- the workflow ----------------------------------------------------------------------------------------
def _config(tmp_path, base_dir, published: dict, include) -> dict:
    return {
        "experiment": "pub",
        "zoo": {"seed": 0, "corpus_sentences": 100, "task_sizes": {"train": 10, "validation": 10, "test": 10}},
        "models": {"tiny": {"source": "local", "path": str(base_dir), "arch": "decoder", "max_length": MAX_LENGTH,
                            "tasks": ["zoo-review", "code"], "vocab_rule": "resize-base",
                            "finetuned": {t: {"source": "local", "path": str(p)} for t, p in published.items()}}},
        "finetune": {"seeds": [0], "optimizers": [{"method": "adamw", "label": "published"}]},
        "prune": [{"method": "dare", "drop_rates": [0.5], "tasks": ["zoo-review"]}],
        "merge": {"methods": [{"method": "task-arithmetic", "params": {"scale": 1.0}}]},
        "evaluate": {"batch_size": 8, "harness_scoring": {"code": ["my_review"]}, "harness_include": str(include),
                     "harness_cache": False},
    }


def _write(tmp_path, config: dict, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def published_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    base_dir = root / "base"
    _base(base_dir)
    published = {"zoo-review": root / "pub-review", "code": root / "pub-code"}
    for i, path in enumerate(published.values()):
        _published(base_dir, path, seed=i + 1)
    # a custom lm-eval task standing in for HumanEval (offline): zoo-review items on a jsonl file
    include = root / "lm-eval-tasks"
    include.mkdir()
    data = root / "my_review.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_task("zoo-review", 0, {"train": 10, "validation": 10, "test": 8})["test"]))
    (include / "my_review.yaml").write_text(json.dumps({**task_config(get_task("zoo-review"), data), "task": "my_review"}))
    return root, base_dir, published, include


def test_published_checkpoints_run_through_prune_merge_and_evaluation(published_setup, tmp_path):
    root, base_dir, published, include = published_setup
    config = _write(tmp_path, _config(tmp_path, base_dir, published, include))
    results = tmp_path / "results" / "pub" / "tiny"
    ft = "ft~published/seed~0"
    result = run_snakemake(tmp_path, "--configfile", str(config), "--cores", "2", "results/pub/metrics.csv",
                           f"results/pub/tiny/code/{ft}/diagnostics/recommendation.json", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rule finetune:" not in result.stdout + result.stderr  # nothing is trained

    # imported: linked, with the manifest a fine-tuning writes
    review = results / "zoo-review" / ft / "checkpoint"
    assert (review / "model.safetensors").is_symlink()
    manifest = read_json(review / "manifest.json")
    assert manifest["stage"] == "finetune" and manifest["method"] == "published"
    assert manifest["published"]["path"] == str(published["zoo-review"].resolve())
    assert manifest["weights_sha256"] == checkpoint_hash(published["zoo-review"])
    assert manifest["vocabulary_rows"] == manifest["base_vocabulary_rows"] + 1
    # the base every stage used has the published vocabulary
    resized = results / "base-resized"
    assert load_state_dict(resized)["model.embed_tokens.weight"].shape[0] == manifest["vocabulary_rows"]
    pruned = read_json(results / "zoo-review" / ft / "prune~dare_rate~0.5_mseed~0" / "checkpoint" / "manifest.json")
    assert pruned["parents"]["base"]["path"].endswith("tiny/base-resized")

    metrics = pd.read_csv(tmp_path / "results" / "pub" / "metrics.csv")
    primary = metrics[metrics["is_primary"]]
    assert set(primary["stage"]) == {"finetune", "prune", "merge"}
    assert set(primary[primary["stage"] == "merge"]["task"]) == {"zoo-review", "code", "lm-eval:my_review"}
    code = primary[(primary["task"] == "code")]
    assert set(code["metric"]) == {"score"} and code["value"].between(0, 1).all()
    # the code task's score is the mean of its one lm-eval task's headline metric
    for stage in ("finetune", "merge"):
        named = metrics[(metrics["stage"] == stage) & (metrics["task"] == "lm-eval:my_review") & (metrics["metric"] == "acc")]
        assert named["value"].item() == pytest.approx(code[code["stage"] == stage]["value"].item())
    selection = read_json(results / "merged" / ft / "merge~task-arithmetic_mseed~0" / "checkpoint" / "selection.json")
    assert set(selection["task_scores"][0]) == {"zoo-review"}  # code has no validation data: not scored
    diagnostics = read_json(results / "code" / ft / "diagnostics" / "recommendation.json")
    assert diagnostics["task"] == "code" and diagnostics["recommendations"]


def test_strict_vocabulary_stops_the_import_naming_the_key(published_setup, tmp_path):
    root, base_dir, published, include = published_setup
    config = _config(tmp_path, base_dir, published, include)
    del config["models"]["tiny"]["vocab_rule"]  # strict
    path = _write(tmp_path, config)
    result = run_snakemake(tmp_path, "--configfile", str(path), "--cores", "1",
                           "results/pub/tiny/code/ft~published/seed~0/checkpoint", timeout=300)
    assert result.returncode != 0
    log = (tmp_path / "results/pub/tiny/code/ft~published/seed~0/import.log").read_text()
    assert "models.tiny.finetuned.code: the checkpoint has" in log and "models.tiny.vocab_rule: resize-base" in log


@pytest.mark.parametrize("change, message", [
    (lambda c, t: c["models"]["tiny"]["finetuned"].update({"glue-cola": {"source": "local", "path": "x"}}),
     r"models\.tiny\.finetuned\.glue-cola: 'glue-cola' is not one of the model's tasks"),
    (lambda c, t: c["models"]["tiny"]["finetuned"].update({"code": {"source": "hub"}}),
     r"Invalid config at key 'models\.tiny\.finetuned\.code': 'id' is a required property"),
    (lambda c, t: c["models"]["tiny"]["finetuned"].update({"code": {"source": "local", "path": str(t)}}),
     r"models\.tiny\.finetuned\.code\.path: .* is not a checkpoint directory \(no config\.json there\)"),
    (lambda c, t: c["models"]["tiny"]["finetuned"].pop("code"),
     r"models\.tiny\.tasks: code has no training data in the suite.*models\.tiny\.finetuned\.code"),
    (lambda c, t: c["evaluate"].pop("harness_scoring"), r"evaluate\.harness_scoring\.code: code \(a task of model tiny\)"),
    (lambda c, t: c["prune"].append({"method": "importance", "drop_rates": [0.5]}),
     r"prune\[1\]: importance fits on task data, and \['code'\] have none"),
])
def test_start_up_checks_name_the_bad_key(published_setup, tmp_path, change, message):
    root, base_dir, published, include = published_setup
    config = _config(tmp_path, base_dir, published, include)
    change(config, tmp_path)
    result = run_snakemake(tmp_path, "--configfile", str(_write(tmp_path, config)), "-n", timeout=120)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), (result.stdout + result.stderr)[-2000:]
