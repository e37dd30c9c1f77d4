"""Config loading and validation, variant enumeration and path helpers shared by every rule."""

import itertools
import os
import re
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

min_version("9.11")

REPO = Path(workflow.basedir)
# `methods` imports here and in every job's script (jobs inherit the environment), also in
# conda environments that do not install this project.
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from methods import registry  # noqa: E402
from methods.data.lm_eval_scored import SOURCE as LM_EVAL_SOURCE, has_suite_data  # noqa: E402
from methods.io.checkpoint import hub_offline  # noqa: E402
from methods.io.sources import package_checkpoint  # noqa: E402
from methods.prune.fit import DATA_DRIVEN, Q_METHODS  # noqa: E402
from methods.tasks import get_task  # noqa: E402

# No `configfile:` directive: it would be merged with a --configfile given on the command line,
# so a user's config would silently inherit the default's models. The default applies only when
# no config is given at all.
if not config:
    with open(REPO / "config" / "config.yaml") as _f:
        config.update(yaml.safe_load(_f))

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def config_key(path) -> str:
    """A JSON path as the config key a user would write, e.g. prune[0].drop_rates[1]."""
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "(top level)"


def describe_schema_error(data) -> str:
    import jsonschema

    with open(SCHEMA) as f:
        schema = yaml.safe_load(f)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    return f"Invalid config at key '{config_key(error.absolute_path)}': {error.message}" if error else ""


_as_given = yaml.safe_load(yaml.safe_dump(dict(config)))
try:
    validate(config, str(SCHEMA))
except Exception as error:  # snakemake's message buries the key: lead with it
    raise ValueError(describe_schema_error(_as_given) or str(error)) from None


def _check_methods() -> None:
    """Method names and parameters against the registry, before any job starts."""
    for i, variant in enumerate(config["finetune"]["optimizers"]):
        where = f"finetune.optimizers[{i}]"
        registry.get("finetune", variant["method"], where + ".method").resolve(variant.get("params"), where + ".params")
    for i, variant in enumerate(config["prune"]):
        where = f"prune[{i}]"
        spec = registry.get("prune", variant["method"], where + ".method")
        spec.resolve({"drop_rate": variant["drop_rates"][0], **variant.get("params", {})}, where + ".params")
        for j, rate in enumerate(variant["drop_rates"]):
            spec.resolve({**variant.get("params", {}), "drop_rate": float(rate)}, f"{where}.drop_rates[{j}]")
        if "drop_rate" in variant.get("params", {}):
            raise registry.MethodConfigError(f"{where}.params.drop_rate: give drop rates in {where}.drop_rates")
        if "q_rule" in variant and variant["method"] not in Q_METHODS:
            raise registry.MethodConfigError(f"{where}.q_rule: only {' and '.join(Q_METHODS)} rescale by 1/q")
        if variant["method"] == "darex-q" and "q_rule" not in variant and "q" not in variant.get("params", {}):
            raise registry.MethodConfigError(f"{where}: darex-q needs q_rule (e.g. {{rule: validation}}) or params.q")
        if variant.get("q_rule", {}).get("rule") == "mse-optimal" and variant["method"] != "darex-q":
            raise registry.MethodConfigError(f"{where}.q_rule.rule: mse-optimal gives a q per neuron; only darex-q applies it")
        if "exclude" in variant and "tensors" in variant:
            raise registry.MethodConfigError(f"{where}: give either exclude or tensors, not both")
    for i, variant in enumerate(config["merge"]["methods"]):
        where = f"merge.methods[{i}]"
        spec = registry.get("merge", variant["method"], where + ".method")
        fixed = variant.get("params", {})
        overlap = sorted(set(fixed) & set(variant.get("grid", {})))
        if overlap:
            raise registry.MethodConfigError(f"{where}.grid.{overlap[0]}: also fixed in {where}.params")
        for key, values in variant.get("grid", {}).items():
            for j, value in enumerate(values):
                spec.resolve({**fixed, key: value}, f"{where}.grid.{key}[{j}]")
        spec.resolve(fixed, where + ".params")
        for name in merge_models(variant):
            if name not in config["models"]:
                raise registry.MethodConfigError(f"{where}.models: {name!r} is not a model of this config")
            count = len(config["models"][name]["tasks"])
            low, high = spec.n_models
            if count < low or (high is not None and count > high):
                raise registry.MethodConfigError(
                    f"{where}: {variant['method']} merges {low}{'' if high == low else '+' if high is None else f'-{high}'} "
                    f"models but {name} has {count} fine-tuned tasks; restrict the variant with 'models:'")
    prunes = {label(v): v for v in config["prune"]}
    for i, variant in enumerate(config["quantize"]):
        where = f"quantize[{i}]"
        spec = registry.get("quantize", variant["method"], where + ".method")
        if "bits" in variant.get("params", {}):
            raise registry.MethodConfigError(f"{where}.params.bits: give code widths in {where}.bits")
        for j, bits in enumerate(variant["bits"]):
            spec.resolve({**variant.get("params", {}), "bits": bits}, f"{where}.bits[{j}]")
        after = variant.get("after")
        if after:
            if after["prune"] not in prunes:
                raise registry.MethodConfigError(
                    f"{where}.after.prune: {after['prune']!r} is not a prune variant label; known: {', '.join(prunes)}")
            rates = [float(r) for r in prunes[after["prune"]]["drop_rates"]]
            if float(after["drop_rate"]) not in rates or float(after["drop_rate"]) == 0:
                raise registry.MethodConfigError(
                    f"{where}.after.drop_rate: {after['drop_rate']} is not a positive drop rate of prune variant "
                    f"{after['prune']!r} ({rates})")
    for section, variants in (("prune", config["prune"]), ("merge.methods", config["merge"]["methods"]),
                              ("quantize", config["quantize"])):
        labels = [label(v) for v in variants]
        if len(set(labels)) != len(labels):
            raise registry.MethodConfigError(
                f"{section}: two variants share the label(s) {sorted({l for l in labels if labels.count(l) > 1})}; set 'label'")
    for name, model in config["models"].items():
        # tasks without data of the suite are never trained (_check_finetuned says what they need)
        trained = [t for t in model["tasks"] if t not in model.get("finetuned", {}) and has_suite_data(t)]
        if trained and model["arch"] not in config["finetune"]:
            raise registry.MethodConfigError(f"finetune.{model['arch']}: no fine-tuning budget for {model['arch']}s "
                                             f"(model {name} fine-tunes {', '.join(trained)})")
        for task in model["tasks"]:
            if get_task(task).arch != model["arch"]:
                raise registry.MethodConfigError(
                    f"models.{name}.tasks: {task} is a {get_task(task).arch} task but {name} is an {model['arch']}")


def _check_model_sources() -> None:
    """Local checkpoints must exist; hub ids must be reachable or already cached."""
    for name, model in config["models"].items():
        if model["source"] == "package":
            try:
                package_checkpoint(model["package"])
            except (ImportError, FileNotFoundError) as error:
                raise registry.MethodConfigError(f"models.{name}.package: {error}") from None
        else:
            _check_checkpoint_source(model, f"models.{name}", ", or use source: local with a checkpoint directory")


def _check_checkpoint_source(entry: dict, where: str, alternative: str = "") -> None:
    """A checkpoint named by a config entry (``where``): a local directory must hold config.json; a
    hub id (at ``revision``, if given) must be in the Hugging Face cache when the workflow runs
    offline. ``alternative`` ends the hub message with what else the user can do."""
    if entry["source"] == "local":
        path = Path(entry["path"])
        if not (path / "config.json").is_file():
            raise registry.MethodConfigError(
                f"{where}.path: {str(path)!r} is not a checkpoint directory (no config.json there)")
    elif entry["source"] == "hub" and hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(entry["id"], "config.json", revision=entry.get("revision")), str):
            raise registry.MethodConfigError(
                f"{where}.id: {entry['id']!r} is not in the local Hugging Face cache and the workflow runs "
                f"offline (HF_HUB_OFFLINE=1); run with HF_HUB_OFFLINE=0 to download it{alternative}")


def _check_finetuned() -> None:
    """Published fine-tuned checkpoints (models.<name>.finetuned) and the tasks only they can provide
    (no data of the suite: instruct, code), before any job starts."""
    scoring = config["evaluate"].get("harness_scoring", {})
    used = {t for m in config["models"].values() for t in m["tasks"]}
    for task in scoring:
        if has_suite_data(task):
            raise registry.MethodConfigError(
                f"evaluate.harness_scoring.{task}: {task} is scored on its own data; run extra lm-eval tasks on "
                "every decoder variant with evaluate.harness_tasks")
        if task not in used:
            raise registry.MethodConfigError(f"evaluate.harness_scoring.{task}: {task} is not a task of any model")
    for name, model in config["models"].items():
        published = model.get("finetuned", {})
        for task in published:
            if task not in model["tasks"]:
                raise registry.MethodConfigError(
                    f"models.{name}.finetuned.{task}: {task!r} is not one of the model's tasks ({model['tasks']})")
        for task, entry in published.items():
            _check_checkpoint_source(entry, f"models.{name}.finetuned.{task}")
        for task in model["tasks"]:
            if has_suite_data(task):
                continue
            if task not in published:
                raise registry.MethodConfigError(
                    f"models.{name}.tasks: {task} has no training data in the suite, so the workflow cannot "
                    f"fine-tune it; give its published checkpoint in models.{name}.finetuned.{task}")
            if not scoring.get(task):
                raise registry.MethodConfigError(
                    f"evaluate.harness_scoring.{task}: {task} (a task of model {name}) has no data of the suite; "
                    "name the lm-eval tasks that score it, e.g. {code: [humaneval, mbpp], instruct: [ifeval]}")
        if model.get("vocab_rule", "strict") == "resize-base":
            if model["arch"] != "decoder":
                raise registry.MethodConfigError(f"models.{name}.vocab_rule: resize-base applies to decoders")
            if not published:
                raise registry.MethodConfigError(
                    f"models.{name}.vocab_rule: resize-base grows the base to its published checkpoints' "
                    f"vocabulary, but models.{name}.finetuned names none")
    # stages that need task data cannot run on a task without it
    no_data = {t for t in used if not has_suite_data(t)}
    for i, variant in enumerate(config["prune"]):
        if variant["method"] in DATA_DRIVEN or "q_rule" in variant:
            hit = sorted(set(variant.get("tasks", sorted(used))) & no_data)
            if hit:
                raise registry.MethodConfigError(
                    f"prune[{i}]: {variant['method']} fits on task data, and {hit} have none; restrict it with tasks:")
    for i, variant in enumerate(config["quantize"]):
        hit = sorted(set(variant.get("tasks", sorted(used))) & no_data)
        if hit:
            raise registry.MethodConfigError(
                f"quantize[{i}]: quantization draws calibration data from the task, and {hit} have none; "
                "restrict it with tasks:")
    for i, variant in enumerate(config["merge"]["methods"]):
        if not variant.get("grid"):
            continue
        for name in merge_models(variant):
            if all(not has_suite_data(t) for t in config["models"][name]["tasks"]):
                raise registry.MethodConfigError(
                    f"merge.methods[{i}].grid: no task of model {name} ({config['models'][name]['tasks']}) has "
                    "validation data to choose the grid point on; fix the parameters in params, or restrict the "
                    "variant with models:")


def _check_data_sources() -> None:
    """Real tasks need their data source configured, and local files must be where the layout says."""
    from methods.data.prepare import local_source_files

    text = config["evaluate"].get("perplexity")
    if text:
        if text["stride"] >= text["window"]:
            raise registry.MethodConfigError("evaluate.perplexity.stride: must be below evaluate.perplexity.window")
        if text["text"] != "zoo" and not Path(text["text"]).is_file():
            raise registry.MethodConfigError(f"evaluate.perplexity.text: {text['text']!r} is not a file")
        for name, model in config["models"].items():
            if model["source"] == "zoo" and model["arch"] == "decoder" and text["window"] > model["max_length"]:
                raise registry.MethodConfigError(
                    f"evaluate.perplexity.window: {text['window']} exceeds models.{name}.max_length "
                    f"({model['max_length']} positions)")

    for name, model in config["models"].items():
        for task in model["tasks"]:
            family = get_task(task).source
            if family in ("zoo", LM_EVAL_SOURCE):  # generated, or no data of the suite at all
                continue
            settings = config.get("data", {}).get(family)
            if not settings:
                raise registry.MethodConfigError(
                    f"models.{name}.tasks: {task} needs data.{family} (source: hub, or source: local with a path)")
            if settings["source"] != "local":
                continue
            missing = [str(p) for p in local_source_files(task, settings["path"]) if not p.is_file()]
            if missing:
                raise registry.MethodConfigError(f"data.{family}.path: {task} needs {', '.join(missing)}, which do(es) not exist")


def _check_variant_tasks() -> None:
    """Tasks a prune variant names must belong to some model (checked after the models themselves)."""
    all_tasks = {t for m in config["models"].values() for t in m["tasks"]}
    for section in ("prune", "quantize"):
        for i, variant in enumerate(config[section]):
            for j, task in enumerate(variant.get("tasks", [])):
                if task not in all_tasks:
                    raise registry.MethodConfigError(f"{section}[{i}].tasks[{j}]: {task!r} is not a task of any model")
    prunes = {label(v): v for v in config["prune"]}
    for i, variant in enumerate(config["quantize"]):
        if "after" in variant:  # a composition needs the pruned variant on each of its tasks
            pruned = prunes[variant["after"]["prune"]].get("tasks", sorted(all_tasks))
            outside = sorted(set(variant.get("tasks", all_tasks)) - set(pruned))
            if outside:
                raise registry.MethodConfigError(
                    f"quantize[{i}].tasks: prune variant {variant['after']['prune']!r} does not prune {outside}; "
                    f"name a subset of {pruned} here")


def label(variant: dict) -> str:
    return variant.get("label", variant["method"])


def merge_models(variant: dict) -> list[str]:
    """Models a merge variant applies to: those it names, else every model with 2+ tasks."""
    return variant.get("models") or [n for n, m in config["models"].items() if len(m["tasks"]) >= 2]


_check_methods()
_check_model_sources()
_check_finetuned()
_check_data_sources()
_check_variant_tasks()

EXP = config["experiment"]
RESULTS = f"results/{EXP}"
REPORT = f"report/{EXP}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def fmt_rate(rate: float) -> str:
    return f"{float(rate):g}"


def finetune_variants() -> dict[str, dict]:
    return {label(v): v for v in config["finetune"]["optimizers"]}


def prune_variants() -> dict[str, dict]:
    return {label(v): v for v in config["prune"]}


def quantize_variants() -> dict[str, dict]:
    return {label(v): v for v in config["quantize"]}


def merge_variants() -> dict[str, dict]:
    return {label(v): v for v in config["merge"]["methods"]}


def merge_mask_seeds(variant: dict) -> list[int]:
    """Random merges (those with a drop rate) expand over mask seeds; deterministic ones run once."""
    random = any(p.name == "drop_rate" for p in registry.get("merge", variant["method"]).params)
    return config["merge"]["mask_seeds"] if random else [0]


def identity(wc, stage: str, method: str, variant: str, **extra) -> dict:
    """The columns that identify a metric row in metrics.csv."""
    record = {"experiment": EXP, "model": wc.model, "arch": config["models"][wc.model]["arch"],
              "task": wc.task, "finetune": wc.ft, "seed": int(wc.seed), "stage": stage, "method": method,
              "variant": variant, "drop_rate": None, "mask_seed": None, "bits": None, "params": {}, "selected_on": ""}
    record.update(extra)
    return record


# -- paths -----------------------------------------------------------------------------------
FT_DIR = RESULTS + "/{model}/{task}/ft~{ft}/seed~{seed}"
PRUNE_DIR = FT_DIR + "/prune~{prune}_rate~{rate}_mseed~{mseed}"
QUANT_DIR = FT_DIR + "/quant~{quant}_bits~{bits}_cseed~{cseed}"
MERGE_DIR = RESULTS + "/{model}/merged/ft~{ft}/seed~{seed}/merge~{merge}_mseed~{mseed}"

wildcard_constraints:
    model="[A-Za-z0-9][A-Za-z0-9.-]*",
    task="[A-Za-z0-9][A-Za-z0-9.-]*",
    ft="[A-Za-z0-9][A-Za-z0-9.-]*",
    prune="[A-Za-z0-9][A-Za-z0-9.-]*",
    merge="[A-Za-z0-9][A-Za-z0-9.-]*",
    quant="[A-Za-z0-9][A-Za-z0-9.-]*",
    bits="[0-9]+",
    seed="[0-9]+",
    mseed="[0-9]+",
    cseed="[0-9]+",
    rate="[0-9.]+(e-?[0-9]+)?",


def base_checkpoint(wildcards):
    """The checkpoint a model's deltas are taken against (and its fine-tunes start from), as a file
    input: the directory of zoo, local and package models and of a resized base; nothing for hub
    ids (transformers resolves them)."""
    if config["models"][wildcards.model].get("vocab_rule") == "resize-base":
        return base_location(wildcards.model)
    return source_base_checkpoint(wildcards)


def base_location(model_name: str) -> str:
    """The base every stage reads: the model's own, or with vocab_rule resize-base its copy with the
    published checkpoints' vocabulary (rule resize_base_vocabulary)."""
    if config["models"][model_name].get("vocab_rule") == "resize-base":
        return f"{RESULTS}/{model_name}/base-resized"
    return source_base_location(model_name)


def source_base_checkpoint(wildcards):
    """The model's own base checkpoint as a file input (nothing for hub ids)."""
    if config["models"][wildcards.model]["source"] == "hub":
        return []
    return source_base_location(wildcards.model)


def source_base_location(model_name: str) -> str:
    """The model's own base, as the config names it."""
    model = config["models"][model_name]
    if model["source"] == "package":
        return str(package_checkpoint(model["package"]))
    return {"zoo": f"{RESULTS}/{model_name}/pretrained", "local": model.get("path"), "hub": model.get("id")}[model["source"]]


# -- published fine-tuned checkpoints (models.<name>.finetuned; methods/io/published.py) ---------------
# FT_DIR/checkpoint of a (model, task) with a published checkpoint comes from rule import_finetuned,
# of every other pair from rule finetune. Snakemake constrains wildcards one by one, so the split is
# a lookahead in the model wildcard's regex, which sees the rest of the path ("<model>/<task>/..."):
# the two rules' outputs never match the same file, with no ruleorder to keep in sync.
PUBLISHED = sorted((name, task) for name, model in config["models"].items() for task in model.get("finetuned", {}))
_PUBLISHED_PAIRS = "|".join(re.escape(f"{name}/{task}/") for name, task in PUBLISHED)
_MODEL_NAME = "[A-Za-z0-9][A-Za-z0-9.-]*"
PUBLISHED_MODEL = f"(?={_PUBLISHED_PAIRS}){_MODEL_NAME}" if PUBLISHED else "(?!)"
TRAINED_MODEL = f"(?!{_PUBLISHED_PAIRS}){_MODEL_NAME}" if PUBLISHED else _MODEL_NAME


def published_references(model_name: str) -> dict[str, str]:
    """task -> the imported checkpoint of each published task of a model, under the first optimizer
    label and seed (every (optimizer, seed) holds the same weights)."""
    ft, seed = next(iter(finetune_variants())), config["finetune"]["seeds"][0]
    return {task: FT_DIR.format(model=model_name, task=task, ft=ft, seed=seed) + "/checkpoint"
            for task in sorted(config["models"][model_name].get("finetuned", {}))}


def quantize_source(wc) -> str:
    """The checkpoint a quantize variant starts from: the fine-tuned model, or the pruned variant
    it names in 'after' (drawn with that variant's first mask seed)."""
    after = quantize_variants()[wc.quant].get("after")
    if not after:
        return FT_DIR.format(model=wc.model, task=wc.task, ft=wc.ft, seed=wc.seed) + "/checkpoint"
    mseed = prune_variants()[after["prune"]]["mask_seeds"][0]
    return PRUNE_DIR.format(model=wc.model, task=wc.task, ft=wc.ft, seed=wc.seed, prune=after["prune"],
                            rate=fmt_rate(after["drop_rate"]), mseed=mseed) + "/checkpoint"


def quantize_identity(wc) -> dict:
    variant = quantize_variants()[wc.quant]
    after = variant.get("after")
    params = {**variant.get("params", {}), "bits": int(wc.bits), "target": variant["target"]}
    extra = {"bits": int(wc.bits), "calibration_seed": int(wc.cseed)}
    if after:
        params["after"] = f"{after['prune']}@{fmt_rate(after['drop_rate'])}"
        extra.update(drop_rate=float(after["drop_rate"]), mask_seed=prune_variants()[after["prune"]]["mask_seeds"][0])
    return identity(wc, "quantize", variant["method"], wc.quant, params=params, **extra)


def task_data(task: str, split: str) -> str:
    return f"{RESULTS}/data/{task}/{split}.jsonl"


def perplexity_text(wildcards) -> str | list:
    """The text decoders are scored on (evaluate.perplexity.text): the zoo's held-out text, a file,
    or nothing (encoders, or no perplexity configured)."""
    settings = config["evaluate"].get("perplexity")
    if not settings or config["models"][wildcards.model]["arch"] != "decoder":
        return []
    return f"{RESULTS}/zoo/heldout.txt" if settings["text"] == "zoo" else settings["text"]


def perplexity_settings() -> dict:
    settings = dict(config["evaluate"].get("perplexity") or {})
    settings.pop("text", None)
    return settings


def harness_cache() -> str:
    return f"{RESULTS}/cache/lm-eval" if config["evaluate"].get("harness_cache", True) else ""


def evaluation_targets() -> list[str]:
    targets = []
    for name, model in config["models"].items():
        for ft, seed in itertools.product(finetune_variants(), config["finetune"]["seeds"]):
            for merge, variant in merge_variants().items():
                if name not in merge_models(variant):
                    continue
                for mseed, task in itertools.product(merge_mask_seeds(variant), model["tasks"]):
                    targets.append(MERGE_DIR.format(model=name, ft=ft, seed=seed, merge=merge, mseed=mseed)
                                   + f"/eval~{task}/metrics.json")
        for task, ft, seed in itertools.product(model["tasks"], finetune_variants(), config["finetune"]["seeds"]):
            targets.append(FT_DIR.format(model=name, task=task, ft=ft, seed=seed) + "/metrics.json")
            for prune, variant in prune_variants().items():
                if task not in variant.get("tasks", [task]):
                    continue
                # Rate 0 drops nothing: that variant is the fine-tuned model, evaluated above.
                rates = [rate for rate in variant["drop_rates"] if float(rate) > 0]
                for rate, mseed in itertools.product(rates, variant["mask_seeds"]):
                    targets.append(PRUNE_DIR.format(model=name, task=task, ft=ft, seed=seed, prune=prune,
                                                    rate=fmt_rate(rate), mseed=mseed) + "/metrics.json")
            for quant, variant in quantize_variants().items():
                if task not in variant.get("tasks", [task]):
                    continue
                for bits, cseed in itertools.product(variant["bits"], variant["calibration_seeds"]):
                    targets.append(QUANT_DIR.format(model=name, task=task, ft=ft, seed=seed, quant=quant, bits=bits,
                                                    cseed=cseed) + "/metrics.json")
    return targets


def diagnostics_targets() -> list[str]:
    """Delta diagnostics of every fine-tuned model."""
    return [FT_DIR.format(model=name, task=task, ft=ft, seed=seed) + "/diagnostics/recommendation.json"
            for name, model in config["models"].items()
            for task, ft, seed in itertools.product(model["tasks"], finetune_variants(), config["finetune"]["seeds"])]


def report_targets() -> list[str]:
    return [f"{REPORT}/README.md", f"{REPORT}/index.md", f"{RESULTS}/metrics.csv"] + [f"{REPORT}/{plot}.png"
                                                                                    for plot in report_plots()]


def report_plots() -> list[str]:
    """The report's plots (each as PNG and PDF): quantization plots only when something is quantized."""
    # the Pareto plot needs measured storage: quantized artifacts or delta checkpoints
    pareto = ["pareto"] if config["quantize"] or config["variant_storage"] == "delta" else []
    return ["score_vs_drop_rate", "delta_diagnostics"] + (["score_vs_bits"] if config["quantize"] else []) + pareto


# -- resources, GPUs and the between-workflow cache (README "Profiles") ------------------------------
def _global_resource(name: str) -> int:
    value = workflow.global_resources.get(name)
    return int(getattr(value, "value", value) or 0)


# A run offers GPUs with `--resources gpu=N` (workstation: N devices to share; SLURM: at most N GPU
# jobs at once); then every GPU-capable job asks for one, else none does (CPU-only). The main process
# decides and its jobs inherit the decision (a SLURM job's own Snakemake sees no --resources).
if workflow.is_main_process:
    os.environ["DCBENCH_GPUS_PER_JOB"] = "1" if _global_resource("gpu") > 0 else "0"
    os.environ["DCBENCH_GPU_POOL"] = str(_global_resource("gpu"))  # read by methods/io/gpu_slots.py
GPUS_PER_JOB = int(os.environ.get("DCBENCH_GPUS_PER_JOB", "0"))
# where the computing jobs compute (methods/device.py: compute_device reads it in the job)
os.environ["DCBENCH_DEVICE"] = config["device"]

# What each kind of job asks for on its first attempt: memory (MB), run time (minutes), a GPU or not.
# Memory and run time grow with the attempt, so `--retries N` resubmits a job that a scheduler killed
# for memory or time with more of both.
JOB_RESOURCES = {
    "light": (1000, 10, False),  # zoo corpus and text, task data, aggregation, report
    "train": (4000, 120, True),  # pretrain, finetune
    "import": (4000, 60, False),  # a published fine-tuned checkpoint linked (or converted), a base resized
    "prune": (2000, 60, True),  # pruning (data-driven q rules run forward passes), delta diagnostics
    "merge": (3000, 120, True),  # a merge and its validation grid
    "evaluate": (2000, 30, True),  # one variant scored on one task
}


def job_resources(kind: str) -> dict:
    """A rule's `resources:` as functions of the attempt: mem_mb, runtime, cpus_per_task (= the
    rule's threads) and gpu (0 or 1, see GPUS_PER_JOB). The config's `resources.<kind>` (e.g. a
    paper config sized for a GPU) replaces the first attempt's values of JOB_RESOURCES."""
    mem_mb, runtime, uses_gpu = JOB_RESOURCES[kind]
    declared = config.get("resources", {}).get(kind, {})
    mem_mb, runtime = declared.get("mem_mb", mem_mb), declared.get("runtime", runtime)
    uses_gpu = bool(declared.get("gpu", uses_gpu))
    return {
        "mem_mb": lambda wildcards, attempt: mem_mb * attempt,
        "runtime": lambda wildcards, attempt: runtime * attempt,
        "cpus_per_task": lambda wildcards, threads, attempt: threads,
        "gpu": lambda wildcards, attempt: GPUS_PER_JOB if uses_gpu else 0,
    }


# Between-workflow cache of pre-training and fine-tuning (methods/io/store.py), on with Snakemake's
# --cache flag given without rule names (the profiles set `cache: []`), in $SNAKEMAKE_OUTPUT_CACHE, else
# results/.cache. The scripts look entries up themselves, inside the job, so it works on every
# executor and with directory outputs. (Snakemake's own `cache:` directive, which `--cache <rule>`
# turns on, computes its key inside a SLURM job without the upstream jobs, fails there on directory
# inputs, and rules out `benchmark:`.)
if workflow.is_main_process:
    os.environ.pop("DCBENCH_CACHE", None)
    if workflow.workflow_settings.cache is not None:
        os.environ.setdefault("SNAKEMAKE_OUTPUT_CACHE", str(Path("results/.cache").absolute()))
        os.environ["DCBENCH_CACHE"] = os.environ["SNAKEMAKE_OUTPUT_CACHE"]
