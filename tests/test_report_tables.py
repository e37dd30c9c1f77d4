"""Comparison tables of methods/report/tables.py: content, best entries, and that every format is
well formed (LaTeX compile-ready, HTML well nested, labels escaped)."""

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from methods.report.tables import (escape_latex, format_number, markdown_grid, to_html, to_latex, to_markdown,
                                   wide_table)

SPECIAL = r"a&b%c$d#e_f{g}h~i^j\k"


def long_table() -> pd.DataFrame:
    rows = [  # method, drop rate, task column, mean, CI
        ("adamw → dare", 0.0, "sst2 (acc)", 0.924, 0.914, 0.934),
        ("adamw → dare", 0.9, "sst2 (acc)", 0.764, 0.744, 0.784),
        ("adamw → dare", 0.0, "cola (mcc)", 0.813, np.nan, np.nan),
        ("adamw → dare", 0.9, "cola (mcc)", 0.268, 0.25, 0.286),
        (SPECIAL, 0.9, "sst2 (acc)", 0.801, 0.79, 0.812),
        (SPECIAL, 0.9, "cola (mcc)", -0.0004, -0.0104, 0.0096),
    ]
    frame = pd.DataFrame(rows, columns=["method", "drop rate", "task", "mean", "ci_low", "ci_high"])
    return frame.assign(n=[3, 3, 1, 3, 3, 3])


def table(**kwargs):
    options = {"value": "mean", "scale": 100, "better": "higher", "caption": "Scores ×100, 95% CI"}
    return wide_table(long_table(), ["method", "drop rate"], "task", **{**options, **kwargs})


def test_wide_table_layout_values_and_half_widths():
    t = table()
    assert t.row_names == ["method", "drop rate"] and t.columns == ["cola (mcc)", "sst2 (acc)"]
    assert t.rows == [(SPECIAL, 0.9), ("adamw → dare", 0.0), ("adamw → dare", 0.9)]
    assert t.cell(1, 1) == ("92.4", "1.0") and t.cell(1, 0) == ("81.3", None)   # no CI: bare mean
    assert t.cell(0, 0) == ("0.0", "1.0")           # -0.04 prints as 0.0, not -0.0
    assert t.label(1, 1) == "0" and t.label(2, 1) == "0.9"
    assert not np.isnan(t.values).any() and t.cell(0, 1) == ("80.1", "1.1")


def test_best_entry_per_column_follows_the_direction_and_displayed_ties():
    assert table().best.tolist() == [[False, False], [True, True], [False, False]]
    low = table(better={"cola (mcc)": "lower", "sst2 (acc)": None})
    assert low.best.tolist() == [[True, False], [False, False], [False, False]]
    # 0.9241 and 0.9238 both print as 92.4: both are best
    frame = pd.DataFrame({"m": ["a", "b", "c"], "c": ["x"] * 3, "value": [0.9241, 0.9238, 0.5]})
    assert wide_table(frame, "m", "c", scale=100, better="higher").best[:, 0].tolist() == [True, True, False]
    one = wide_table(frame.head(1), "m", "c", better="higher")
    assert not one.best.any()        # a single entry is not "best" of anything


def test_wide_table_errors_name_the_problem():
    frame = long_table()
    with pytest.raises(KeyError, match="'model'"):
        wide_table(frame, ["model", "method"], "task")
    with pytest.raises(KeyError, match="ci_high"):
        wide_table(frame.drop(columns="ci_high"), ["method", "drop rate"], "task", value="mean")
    with pytest.raises(ValueError, match=r"share a \(row, column\) cell"):
        wide_table(frame, "method", "task", value="mean")
    with pytest.raises(ValueError, match="not in the data"):
        wide_table(frame, ["method", "drop rate"], "task", value="mean", column_order=["sst2 (acc)", "qqp"])
    with pytest.raises(ValueError, match="better must be"):
        wide_table(frame, ["method", "drop rate"], "task", value="mean", better="bigger")
    with pytest.raises(ValueError, match="not in the table"):
        wide_table(frame, ["method", "drop rate"], "task", value="mean", better={"sst-2": "higher"})


def test_explicit_orders_and_an_error_column():
    frame = long_table().drop(columns=["ci_low", "ci_high"]).assign(sd=0.02)
    t = wide_table(frame, ["method", "drop rate"], "task", value="mean", error="sd", scale=100,
                   row_order=[("adamw → dare", 0.9), ("adamw → dare", 0.0), (SPECIAL, 0.9)],
                   column_order=["sst2 (acc)", "cola (mcc)"])
    assert t.columns == ["sst2 (acc)", "cola (mcc)"] and t.rows[0] == ("adamw → dare", 0.9)
    assert t.cell(0, 0) == ("76.4", "2.0")


def test_format_number_and_markdown_grid():
    assert format_number(-0.0004, 100, 1) == "0.0" and format_number(-0.004, 100, 1) == "-0.4"
    assert markdown_grid(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_markdown_table():
    text = to_markdown(table())
    lines = text.splitlines()
    assert lines[0] == "Scores ×100, 95% CI" and lines[2] == "| method | drop rate | cola (mcc) | sst2 (acc) |"
    assert lines[3] == "|---|---|---|---|"
    assert lines[5] == "| adamw → dare | 0 | **81.3** | **92.4 ± 1.0** |"
    assert lines[4].startswith(f"| {SPECIAL} | 0.9 | 0.0 ± 1.0 |")
    piped = wide_table(pd.DataFrame({"m": ["a|b"], "c": ["x"], "value": [1.0]}), "m", "c")
    assert "| a\\|b | 1.0 |" in to_markdown(piped)


# -- LaTeX ----------------------------------------------------------------------------------------
def _unescaped(text: str, char: str) -> int:
    """Occurrences of ``char`` not preceded by a backslash."""
    return len(re.findall(r"(?<!\\)" + re.escape(char), text))


def check_latex(text: str) -> None:
    """What a LaTeX compiler would choke on in a table: unbalanced braces or environments,
    rows with the wrong number of cells, rules out of order."""
    body = text.replace("\\\\", "")    # row ends are not escapes of the next character
    assert _unescaped(body, "{") == _unescaped(body, "}"), "unbalanced braces"
    depth = 0
    for ch, prev in zip(body, " " + body):
        if prev != "\\":
            depth += (ch == "{") - (ch == "}")
            assert depth >= 0, "closing brace before its opening one"
    stack = []
    for kind, name in re.findall(r"\\(begin|end)\{(\w+)\}", text):
        if kind == "begin":
            stack.append(name)
        else:
            assert stack and stack.pop() == name, f"\\end{{{name}}} does not close the open environment"
    assert not stack, f"unclosed environments {stack}"
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", text).group(1)
    tabular = text[text.index("\\begin{tabular}"):text.index("\\end{tabular}")]
    rows = [line for line in tabular.splitlines()[1:] if line.endswith("\\\\")]
    assert rows, "no table rows"
    for line in rows:
        assert _unescaped(line, "&") + 1 == len(spec), f"{line!r} has the wrong number of cells for {spec!r}"
    rules = [r for r in re.findall(r"\\(toprule|midrule|bottomrule)", text)]
    assert rules == ["toprule", "midrule", "bottomrule"]
    text_mode = re.sub(r"(?<!\\)\$[^$]*(?<!\\)\$", "", text)   # drop math segments
    for char in "%#_$^~":   # in text mode every one of these must be escaped
        assert _unescaped(text_mode, char) == 0, f"unescaped {char!r} in text mode"


def test_latex_is_compile_ready_with_escaped_labels_and_bold_best():
    t = table()
    text = to_latex(t, label="tab:prune scores")
    check_latex(text)
    assert "\\begin{tabular}{llrr}" in text and "\\caption{Scores $\\times$100, 95\\% CI}" in text
    assert "\\label{tab:prune-scores}" in text
    assert escape_latex(SPECIAL) in text and SPECIAL not in text
    assert escape_latex(SPECIAL) == (r"a\&b\%c\$d\#e\_f\{g\}h\textasciitilde{}i\textasciicircum{}j"
                                     r"\textbackslash{}k")
    assert "adamw $\\rightarrow$ dare & 0 & $\\mathbf{81.3}$ & $\\mathbf{92.4 \\pm 1.0}$ \\\\" in text
    bare = to_latex(t, float_env=False)
    check_latex(bare)
    assert bare.startswith("\\begin{tabular}") and "\\caption" not in bare


def test_latex_missing_entries_and_special_column_labels():
    frame = pd.DataFrame({"variant": ["x_1", "x_1", "y&z"], "task": ["t#1", "50% {b}", "t#1"],
                          "value": [0.5, 0.25, 0.75]})
    t = wide_table(frame, "variant", "task", better="lower")
    assert t.cell(1, 0) == ("–", None) and "| y&z | – | 0.8 |" in to_markdown(t)
    text = to_latex(t)
    check_latex(text)
    assert "variant & 50\\% \\{b\\} & t\\#1 \\\\" in text
    assert "y\\&z & -- & $0.8$ \\\\" in text   # missing entry: an en dash, outside math


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles_with_pdflatex(tmp_path):
    frame = long_table()
    frame.loc[len(frame)] = ["ε Ω é ✓ 中 <x> |y| ± δ", 0.5, "sst2 (acc)", 0.5, 0.4, 0.6, 3]
    source = tmp_path / "table.tex"
    source.write_text(to_latex(wide_table(frame, ["method", "drop rate"], "task", value="mean", better="higher",
                                          caption=f"caption with {SPECIAL}"), label="tab:x", standalone=True))
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", source.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert (tmp_path / "table.pdf").stat().st_size > 1000


# -- HTML -----------------------------------------------------------------------------------------
class _Structure(HTMLParser):
    VOID = {"br", "hr", "img", "meta", "link", "input", "col"}

    def __init__(self):
        super().__init__()
        self.stack, self.rows, self.text, self.strong = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "tr":
            self.rows.append(0)
        if tag in ("td", "th"):
            self.rows[-1] += 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"</{tag}> closes the wrong element"

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] == "strong":
            self.strong.append(data)


def test_html_is_well_nested_escaped_and_marks_the_best():
    frame = long_table()
    frame.loc[len(frame)] = ["<script>alert('x')</script> & co", 0.5, "sst2 (acc)", 0.5, 0.4, 0.6, 3]
    text = to_html(wide_table(frame, ["method", "drop rate"], "task", value="mean", scale=100, better="higher",
                              caption="Scores <b>×100</b>"), table_id="prune")
    parser = _Structure()
    parser.feed(text)
    parser.close()
    assert not parser.stack
    assert text.startswith('<table id="prune">') and "<caption>Scores &lt;b&gt;×100&lt;/b&gt;</caption>" in text
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in text
    assert set(parser.rows) == {4}      # 2 label cells + 2 value cells in every row, header included
    assert parser.strong == ["81.3", "92.4 ± 1.0"]
    assert 'title="n = 3"' in text and "<td" in text


def test_grids_of_formatted_cells_in_latex_and_html():
    from methods.report.tables import grid_html, grid_latex

    header = ["variant", "zoo-sentiment (accuracy)", "50% {b}"]
    rows = [["adamw → ties", "91.2 ± 0.4", "a&b"], ["x_y", "–", "<tag>"]]
    text = grid_latex(header, rows)
    check_latex(text)
    assert text.startswith("\\begin{tabular}{lrr}") and text.count(" \\\\\n") == 3
    assert "a\\&b" in text and "x\\_y" in text and "50\\% \\{b\\}" in text
    page = grid_html(header, rows)
    assert page.count("<tr>") == 3 and "&lt;tag&gt;" in page and "a&amp;b" in page
    assert page.count("<table>") == page.count("</table>") == 1
