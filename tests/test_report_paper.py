"""Published figures (report/paper_numbers/*.csv): they load, each is backed by a verified line of
the research notes, unverified figures are refused, and the join with our metrics is right."""

import csv
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SHARED
from methods.report.aggregate import COLUMNS as METRIC_COLUMNS
from methods.report.paper import (COLUMNS, PaperNumbersError, check_against_specs, comparison_table,
                                  load_paper_numbers, parse_source, read_paper_file, reported_vs_reproduced)
from methods.report.tables import to_html, to_latex, to_markdown

NUMBERS = REPO / "report" / "paper_numbers"
SPECS = SHARED / "specs"
SPEC_FILES = {"dpp_merge.md", "quantization.md", "anchors.md"}


@pytest.fixture
def specs():
    if not SPECS.is_dir():
        pytest.skip("../shared/specs is not present")
    return SPECS


def write_csv(path, rows: list[dict], columns=COLUMNS):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return path


def figure(**overrides) -> dict:
    row = {"paper": "demo", "citation": "A. Author: A Paper. 2025", "table": "Table 1", "model": "BERT-base",
           "task": "CoLA", "method": "DARE", "setting": "p=0.9", "metric": "MCC", "unit": "percent",
           "value": "50.0", "source": "dpp_merge.md §6.1 [paper]", "our_task": "glue-cola", "our_method": "dare",
           "drop_rate": "0.9"}
    return {**row, **overrides}


# -- the shipped files ---------------------------------------------------------------------------
def test_every_paper_file_loads_with_typed_columns():
    frame = load_paper_numbers(NUMBERS)
    files = sorted(p.stem for p in NUMBERS.glob("*.csv"))
    assert files == sorted(frame["paper"].unique()) and {"dare", "gptq", "discquant", "ofq"} <= set(files)
    assert list(frame.columns) == COLUMNS
    assert frame["value"].dtype == float and np.isfinite(frame["value"]).all()
    assert frame["drop_rate"].dtype == float and frame["bits"].dtype == float
    gptq = frame[(frame["paper"] == "gptq") & (frame["model"] == "LLaMa-7B")]
    assert gptq.set_index("setting")["value"].to_dict()["3-bit g128, act-order, true-sequential"] == 6.61
    assert set(frame.loc[frame["paper"] == "discquant", "value"]) == {84.0, 64.0, 54.0, 31.0}


def test_every_source_names_a_spec_section_with_a_primary_tag():
    for source in load_paper_numbers(NUMBERS)["source"]:
        file, section, tags = parse_source(source)
        assert file in SPEC_FILES and section[0].isdigit()
        assert tags and set(tags) <= {"code", "abs", "paper", "readme"}


def test_every_figure_is_backed_by_its_spec_section(specs):
    check_against_specs(load_paper_numbers(NUMBERS), specs)   # raises, listing every row that is not


# -- the spec check can fail ---------------------------------------------------------------------
def test_spec_check_rejects_a_mistyped_figure_and_a_wrong_section(specs):
    frame = load_paper_numbers(NUMBERS)
    typo = frame[frame["paper"] == "gptq"].head(1).assign(value=5.67)       # README: 5.68
    with pytest.raises(PaperNumbersError, match=r"5\.67 does not appear in quantization.md §8.A"):
        check_against_specs(typo, specs)
    moved = frame[frame["paper"] == "gptq"].head(1).assign(source="quantization.md §8.Z [code]")
    with pytest.raises(PaperNumbersError, match="has no section §8.Z"):
        check_against_specs(moved, specs)
    missing = frame.head(1).assign(source="nowhere.md §1 [code]")
    with pytest.raises(PaperNumbersError, match="nowhere.md does not exist"):
        check_against_specs(missing, specs)


def test_spec_check_rejects_a_figure_copied_from_an_unverified_line(specs, tmp_path):
    # dpp_merge.md §6.1 has [paper] facts, but "BERT CoLA, DAREx-q @ p=0.99 ≈ 53" is [2nd; verify]:
    # claiming it as [paper] passes the loader, not the check against the note.
    path = write_csv(tmp_path / "darex.csv", [figure(paper="darex", method="DAREx-q", setting="p=0.99", value="53",
                                                     our_method="darex-q", drop_rate="0.99")])
    frame = read_paper_file(path)
    with pytest.raises(PaperNumbersError, match=r"53 does not appear in dpp_merge.md §6.1 outside lines marked"):
        check_against_specs(frame, specs)


def test_spec_check_on_a_synthetic_note(tmp_path):
    (tmp_path / "note.md").write_text("# Note\n\n## 3. Tables\n\n**A. One** [code]\n| x | 12.5 |\n"
                                      "**B. Two** [code]\n| y | 7.0 [2nd] |\n\n## 4. Next\n| z | 99 |\n")
    frame = pd.DataFrame([{"paper": "p", "model": "m", "method": "x", "setting": "s", "value": v,
                           "source": f"note.md §3.{letter} [code]"} for v, letter in [(12.5, "A"), (7.0, "B"),
                                                                                       (99.0, "A"), (12.5, "B")]])
    with pytest.raises(PaperNumbersError) as error:
        check_against_specs(frame, tmp_path)
    problems = str(error.value).splitlines()[1:]
    # only 12.5 in §3.A holds up: 7.0 is on a [2nd] line, 99 is in §4, 12.5 is not in §3.B
    assert [p.split(" = ")[1].split(":")[0] for p in problems] == ["7", "99", "12.5"]
    assert all("does not appear" in p for p in problems)


# -- validation of a paper file -----------------------------------------------------------------
@pytest.mark.parametrize("source, tags", [
    ("dpp_merge.md §6.1 [2nd, LLM review; verify]", "['2nd', 'llm review', 'verify']"),
    ("quantization.md §4 [unverified]", "['unverified']"),
    ("quantization.md §5 [infer]", "['infer']"),
    ("dpp_merge.md §6.1 [paper/2nd]", "['2nd']"),
])
def test_a_row_whose_tag_is_not_verified_is_rejected(tmp_path, source, tags):
    path = write_csv(tmp_path / "demo.csv", [figure(), figure(setting="p=0.99", source=source)])
    with pytest.raises(PaperNumbersError) as error:
        read_paper_file(path)
    message = str(error.value)
    assert str(path) in message and "line 3" in message and tags in message and "not verified" in message


def test_verification_lives_in_the_tag_not_in_a_column(tmp_path):
    columns = COLUMNS + ["verified"]
    path = write_csv(tmp_path / "demo.csv", [{**figure(), "verified": "yes"}], columns=columns)
    with pytest.raises(PaperNumbersError, match=r"unknown column\(s\) \['verified'\]"):
        read_paper_file(path)


@pytest.mark.parametrize("overrides, message", [
    ({"value": "≈ 4"}, "line 2: column 'value' = '≈ 4' is not a number"),
    ({"value": ""}, "line 2: column 'value' is empty"),
    ({"bits": "3.5"}, "line 2: column 'bits' = '3.5' is not a whole number"),
    ({"drop_rate": "1.5"}, "line 2: column 'drop_rate' = '1.5' is outside"),
    ({"unit": "%"}, "line 2: unit '%' is not one of"),
    ({"paper": "other"}, "line 2: paper 'other' differs from the file name 'demo'"),
    ({"source": "Table 2 of the paper"}, "line 2: source 'Table 2 of the paper' does not read"),
    ({"our_method": "dare-x"}, "line 2: column 'our_method' = 'dare-x' is not one of ours"),
    ({"our_task": "cola"}, "line 2: column 'our_task' = 'cola' is not one of ours"),
    ({"our_metric": "acc@1"}, "line 2: column 'our_metric' = 'acc@1' is not one of ours"),
])
def test_bad_cells_are_named_by_file_line_and_column(tmp_path, overrides, message):
    path = write_csv(tmp_path / "demo.csv", [figure(**overrides)])
    with pytest.raises(PaperNumbersError) as error:
        read_paper_file(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_lm_eval_tasks_run_by_name_are_accepted(tmp_path):
    path = write_csv(tmp_path / "demo.csv", [figure(our_task="lm-eval:arc_easy", our_metric="acc_norm")])
    assert read_paper_file(path)["our_task"].tolist() == ["lm-eval:arc_easy"]


def test_structural_problems_name_the_file(tmp_path):
    with pytest.raises(PaperNumbersError, match=r"missing column\(s\) \['bits'\]"):
        read_paper_file(write_csv(tmp_path / "demo.csv", [figure()], columns=COLUMNS[:-1]))
    with pytest.raises(PaperNumbersError, match="no figures"):
        read_paper_file(write_csv(tmp_path / "demo.csv", []))
    with pytest.raises(PaperNumbersError, match=r"lines \[2, 3\] describe the same figure"):
        read_paper_file(write_csv(tmp_path / "demo.csv", [figure(), figure(value="51")]))
    with pytest.raises(PaperNumbersError, match="lower-case paper key"):
        read_paper_file(write_csv(tmp_path / "Demo Paper.csv", [figure()]))
    with pytest.raises(PaperNumbersError, match="no paper-numbers CSV files"):
        load_paper_numbers(tmp_path / "empty")


def test_a_bad_file_among_good_ones_stops_the_load(tmp_path):
    for path in NUMBERS.glob("*.csv"):
        shutil.copy(path, tmp_path / path.name)
    write_csv(tmp_path / "zzz.csv", [figure(paper="zzz", value="n/a")])
    with pytest.raises(PaperNumbersError, match=r"zzz.csv, line 2: column 'value'"):
        load_paper_numbers(tmp_path)


# -- reported vs reproduced ----------------------------------------------------------------------
def metric_row(**values) -> dict:
    row = {c: np.nan for c in METRIC_COLUMNS}
    row.update({"experiment": "x", "arch": "decoder", "finetune": "adamw", "seed": 0, "params": "{}", "split": "test",
                "is_primary": True, "checkpoint_sha256": "0" * 64, "variant": values.get("method")})
    row.update(values)
    return row


def synthetic_metrics() -> pd.DataFrame:
    rows = [
        # the unquantized model, two fine-tuning seeds: 0.80 and 0.82 -> 81.0
        metric_row(model="phi-3-mini-4k", task="gsm8k", stage="finetune", method="adamw", metric="exact_match",
                   value=0.80),
        metric_row(model="phi-3-mini-4k", task="gsm8k", stage="finetune", method="adamw", metric="exact_match",
                   value=0.82, seed=1),
        metric_row(model="phi-3-mini-4k", task="gsm8k", stage="finetune", method="adamw", metric="flexible",
                   value=0.99, is_primary=False),
        # two RTN variants at 3 bits are two reproductions, not one average
        metric_row(model="phi-3-mini-4k", task="gsm8k", stage="quantize", method="rtn", variant="rtn-g64", bits=3.0,
                   metric="exact_match", value=0.30),
        metric_row(model="phi-3-mini-4k", task="gsm8k", stage="quantize", method="rtn", variant="rtn-channel",
                   bits=3.0, metric="exact_match", value=0.10),
        # RTN of a DARE delta: drop_rate set, must not stand in for plain RTN
        metric_row(model="phi-3-mini-4k", task="gsm8k", stage="quantize", method="rtn", variant="dare-rtn", bits=3.0,
                   drop_rate=0.9, mask_seed=0.0, metric="exact_match", value=0.05),
        # GPTQ at 4 bits only: the paper's 3-bit GPTQ stays "not run"
        metric_row(model="phi-3-mini-4k", task="gsm8k", stage="quantize", method="gptq", bits=4.0,
                   metric="exact_match", value=0.70),
        # a stand-in model for DiscQuant, two mask seeds... of a method with no mask: seeds 0 and 1
        metric_row(model="tiny-llama", task="gsm8k", stage="quantize", method="discquant", bits=3.0,
                   metric="exact_match", value=0.5, seed=0),
        metric_row(model="tiny-llama", task="gsm8k", stage="quantize", method="discquant", bits=3.0,
                   metric="exact_match", value=0.6, seed=1),
        # perplexity of the fine-tuned decoder (raw units)
        metric_row(model="tiny-llama", task="zoo-review", stage="finetune", method="adamw", metric="perplexity",
                   value=6.0, is_primary=False),
        metric_row(model="tiny-llama", task="zoo-review", stage="finetune", method="adamw", metric="acc", value=0.5),
    ]
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def test_join_with_our_metrics():
    papers = load_paper_numbers(NUMBERS)
    result = reported_vs_reproduced(papers[papers["paper"] == "discquant"], synthetic_metrics())
    by = {(r.method, r.our_variant if isinstance(r.our_variant, str) else None): r for r in result.itertuples()}
    assert len(result) == 5
    original = by[("original model", "adamw")]
    assert original.reproduced == pytest.approx(81.0) and original.n_runs == 2 and original.our_metric == "exact_match"
    assert original.difference == pytest.approx(81.0 - 84.0) and original.same_model
    assert original.reproduced_std == pytest.approx(100 * np.std([0.80, 0.82], ddof=1))
    assert by[("RTN", "rtn-g64")].reproduced == pytest.approx(30.0) and by[("RTN", "rtn-channel")].reproduced == 10.0
    assert "dare-rtn" not in set(result["our_variant"].dropna())
    gptq = by[("GPTQ", None)]
    assert math.isnan(gptq.reproduced) and gptq.n_runs == 0 and math.isnan(gptq.difference)
    discquant = by[("DiscQuant", "discquant")]
    assert discquant.reproduced == pytest.approx(55.0) and discquant.n_runs == 2 and not discquant.same_model
    assert discquant.our_model == "tiny-llama" and discquant.reported == 64.0


def test_join_in_raw_units_with_a_named_metric_and_rows_without_a_counterpart(tmp_path):
    path = write_csv(tmp_path / "demo.csv", [
        figure(task="text", method="FP16", setting="16-bit", metric="ppl", unit="raw", value="5.5",
               our_task="zoo-review", our_method="finetuned", our_metric="perplexity", drop_rate=""),
        figure(task="ImageNet", method="OFQ", setting="W2-A2", value="64.33", our_task="", our_method="", drop_rate=""),
    ])
    result = reported_vs_reproduced(read_paper_file(path), synthetic_metrics())
    assert result["reproduced"].iloc[0] == pytest.approx(6.0) and result["difference"].iloc[0] == pytest.approx(0.5)
    assert math.isnan(result["reproduced"].iloc[1]) and result["n_runs"].tolist() == [1, 0]


def test_join_needs_the_tidy_table():
    papers = load_paper_numbers(NUMBERS)
    with pytest.raises(KeyError, match="bits"):
        reported_vs_reproduced(papers, synthetic_metrics().drop(columns=["bits"]))


def test_comparison_table_shows_not_run_in_every_format():
    papers = load_paper_numbers(NUMBERS)
    result = reported_vs_reproduced(papers[papers["paper"] == "discquant"], synthetic_metrics())
    table = comparison_table(result, caption="DiscQuant, GSM8k (%)")
    assert table.columns == ["reported", "reproduced", "difference"] and len(table.rows) == len(result)
    markdown = to_markdown(table)
    assert "| 84.00 | 81.00 | -3.00 |" in markdown and "| 54.00 | not run | not run |" in markdown
    assert "phi-3-mini-4k: adamw → rtn-g64" in markdown
    assert "not run" in to_latex(table) and "not run" in to_html(table)
