"""Comparison tables from the long (tidy) table, rendered as Markdown, LaTeX and HTML.

``wide_table`` turns rows of (row labels..., column label, value[, ci_low, ci_high | error][, n])
into a ``Table``; ``to_markdown``, ``to_latex`` and ``to_html`` render the same ``Table``, so the
three formats of a report always show the same numbers, the same rounding and the same best
entries. What the ± means (a confidence-interval half-width, a standard deviation) is the caller's
to state in the caption: the table only carries the number.

Best entries are chosen on the *displayed* (scaled and rounded) values, so two entries that print
the same are both marked: the reader cannot tell them apart, and the table should not pretend to.
A column is marked only when it has a direction ("higher" or "lower" is better) and at least two
entries.
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

MISSING = "–"
DIRECTIONS = ("higher", "lower")


@dataclass(eq=False)
class Table:
    """A rendered-format-agnostic comparison table.

    ``values`` and ``errors`` are (rows, columns) float arrays in the data's units (NaN: no entry /
    no ±); ``scale`` and ``digits`` (per column) say how to print them; ``better[j]`` is "higher",
    "lower" or None for column j."""
    row_names: list[str]
    rows: list[tuple]
    columns: list[str]
    values: np.ndarray
    errors: np.ndarray
    counts: np.ndarray
    better: list[str | None]
    scale: list[float]
    digits: list[int]
    caption: str = ""
    missing: str = MISSING
    best: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        shape = (len(self.rows), len(self.columns))
        for name in ("values", "errors", "counts"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"Table.{name} has shape {getattr(self, name).shape}, expected {shape}")
        for direction in self.better:
            if direction not in (*DIRECTIONS, None):
                raise ValueError(f"better must be 'higher', 'lower' or None, got {direction!r}")
        self.best = self._best()

    def shown(self, j: int) -> np.ndarray:
        """Column j as printed (scaled, rounded), NaN where empty."""
        return np.round(self.scale[j] * self.values[:, j], self.digits[j])

    def _best(self) -> np.ndarray:
        best = np.zeros(self.values.shape, dtype=bool)
        for j, direction in enumerate(self.better):
            shown = self.shown(j)
            finite = np.isfinite(shown)
            if direction is None or finite.sum() < 2:
                continue
            target = shown[finite].max() if direction == "higher" else shown[finite].min()
            best[:, j] = finite & (shown == target)
        return best

    def cell(self, i: int, j: int) -> tuple[str, str | None]:
        """(value text, ± text or None) of one entry; ("–", None) when empty."""
        value = self.values[i, j]
        if not math.isfinite(value):
            return self.missing, None
        error = self.errors[i, j]
        text = format_number(value, self.scale[j], self.digits[j])
        return text, format_number(error, self.scale[j], self.digits[j]) if math.isfinite(error) else None

    def label(self, i: int, k: int) -> str:
        return format_label(self.rows[i][k], self.missing)


# -- building -----------------------------------------------------------------------------------
def format_number(value: float, scale: float = 1.0, digits: int = 1) -> str:
    """Fixed-point text of ``scale * value``; "-0.0" prints as "0.0" (a sign on a rounded zero
    reads as a real negative score)."""
    text = f"{scale * value:.{digits}f}"
    if text.startswith("-") and float(text) == 0.0:
        text = text[1:]
    return text


def format_label(value, missing: str = MISSING) -> str:
    """Row-label text: floats as ``:g`` (a drop rate 0.9, not 0.9000000000000001), NaN as missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _per_column(setting, columns: list[str], name: str, default):
    if isinstance(setting, Mapping):
        unknown = sorted(set(setting) - set(columns))
        if unknown:
            raise ValueError(f"{name} names column(s) {unknown} that are not in the table {columns}")
        return [setting.get(c, default) for c in columns]
    return [setting] * len(columns)


def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"missing column(s) {missing}; the table has {list(frame.columns)}")


def _key(labels) -> tuple:
    """A hashable row key: NaN (which never equals itself) becomes None."""
    return tuple(None if isinstance(x, float) and math.isnan(x) else x for x in labels)


def _ordered(found: list, order: Sequence | None, what: str) -> list:
    if order is None:
        return found
    order = list(order)
    unknown = [x for x in order if x not in found]
    left_out = [x for x in found if x not in order]
    if unknown or left_out:
        raise ValueError(f"{what} order does not match the data: not in the data {unknown}, "
                         f"in the data but not in the order {left_out}")
    return order


def wide_table(long: pd.DataFrame, rows: str | Sequence[str], column: str, value: str = "value", *,
               ci: tuple[str, str] = ("ci_low", "ci_high"), error: str | None = None, n: str = "n",
               better: str | None | Mapping[str, str | None] = None, scale: float | Mapping[str, float] = 1.0,
               digits: int | Mapping[str, int] = 1, row_order: Sequence | None = None,
               column_order: Sequence | None = None, caption: str = "", missing: str = MISSING) -> Table:
    """One row per distinct combination of the ``rows`` columns, one column per distinct value of
    ``column``, entries from ``value``.

    The ± of an entry is the half-width (ci_high − ci_low)/2 when both ``ci`` columns exist (an
    asymmetric bootstrap interval is thereby symmetrized for display), else the ``error`` column
    when given (e.g. a standard deviation), else none; NaN means no ± for that entry. ``n`` (when
    present) is kept for the HTML tooltip. ``better``, ``scale`` and ``digits`` apply to the whole
    table or, as a dict, per column label. Rows are sorted (NaN labels first) and columns sorted
    unless ``row_order`` (row-label tuples, or scalars with a single row column) or
    ``column_order`` list every one of them. The row-label column names become the header.

    Two input rows for the same (row, column) cell raise an error instead of being averaged or
    dropped: that happens when a grouping column (model, seed, ...) was left out of ``rows``."""
    row_columns = [rows] if isinstance(rows, str) else list(rows)
    _require(long, row_columns + [column, value])
    if error is not None:
        _require(long, [error])
    has_ci = [c in long.columns for c in ci]
    if any(has_ci) and not all(has_ci):
        raise KeyError(f"confidence interval needs both columns {list(ci)}; only {ci[has_ci.index(True)]!r} "
                       f"is in the table {list(long.columns)}")
    keys = long[row_columns + [column]]
    duplicated = keys.duplicated(keep=False)
    if duplicated.any():
        examples = keys[duplicated].drop_duplicates().head(3).to_dict("records")
        raise ValueError(f"{int(duplicated.sum())} rows share a (row, column) cell, e.g. {examples}: "
                         f"add the column that tells them apart to rows={row_columns} or aggregate first")

    found_rows = [_key(r) for r in long[row_columns].drop_duplicates()
                  .sort_values(row_columns, kind="stable", na_position="first").itertuples(index=False)]
    if row_order is not None:
        row_order = [_key(r) if isinstance(r, (tuple, list)) else _key((r,)) for r in row_order]
    row_labels = _ordered(found_rows, row_order, "row")
    column_labels = [str(c) for c in _ordered(sorted(long[column].unique(), key=str), column_order, "column")]

    row_index = {r: i for i, r in enumerate(row_labels)}
    column_index = {c: j for j, c in enumerate(column_labels)}
    shape = (len(row_labels), len(column_labels))
    values, errors, counts = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    label_rows = long[row_columns].itertuples(index=False)
    for record_key, record in zip(label_rows, long.to_dict("records")):
        i, j = row_index[_key(record_key)], column_index[str(record[column])]
        values[i, j] = float(record[value])
        if all(has_ci):
            errors[i, j] = (float(record[ci[1]]) - float(record[ci[0]])) / 2.0
        elif error is not None:
            errors[i, j] = float(record[error])
        if n in long.columns:
            counts[i, j] = float(record[n])

    directions = _per_column(better, column_labels, "better", None)
    return Table(row_names=row_columns, rows=row_labels, columns=column_labels, values=values, errors=errors,
                 counts=counts, better=directions,
                 scale=[float(s) for s in _per_column(scale, column_labels, "scale", 1.0)],
                 digits=[int(d) for d in _per_column(digits, column_labels, "digits", 1)], caption=caption,
                 missing=missing)


# -- Markdown -----------------------------------------------------------------------------------
def escape_markdown(text: str) -> str:
    """A pipe would end the cell, a newline the row, and an asterisk could pair with the bold markers."""
    return str(text).replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def markdown_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A pipe table from already formatted cells (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(table: Table) -> str:
    """GitHub pipe table; best entries in **bold**; the caption, if any, as a paragraph above."""
    header = [escape_markdown(c) for c in table.row_names + table.columns]
    body = []
    for i in range(len(table.rows)):
        cells = [escape_markdown(table.label(i, k)) for k in range(len(table.row_names))]
        for j in range(len(table.columns)):
            text, pm = table.cell(i, j)
            text = f"{text} ± {pm}" if pm is not None else text
            cells.append(f"**{text}**" if table.best[i, j] else text)
        body.append(cells)
    grid = markdown_grid(header, body)
    return f"{escape_markdown(table.caption)}\n\n{grid}" if table.caption else grid


# -- LaTeX --------------------------------------------------------------------------------------
_LATEX_ESCAPES = {
    "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}", "\n": " ",
    # characters our labels use that pdflatex cannot typeset from UTF-8 input on its own
    "–": "--", "—": "---", "→": r"$\rightarrow$", "←": r"$\leftarrow$", "±": r"$\pm$", "×": r"$\times$",
    "≤": r"$\leq$", "≥": r"$\geq$", "·": r"$\cdot$", "‖": r"$\|$", "−": "$-$", "δ": r"$\delta$",
    "Δ": r"$\Delta$", "θ": r"$\theta$", "λ": r"$\lambda$", "α": r"$\alpha$", "β": r"$\beta$",
    "σ": r"$\sigma$", "μ": r"$\mu$", "₀": r"$_0$", "²": r"$^2$", "√": r"$\surd$", "Σ": r"$\Sigma$",
}


# Greek letters: math commands, except those that look like Latin letters (no command exists).
_GREEK_LATIN = {"ALPHA": "A", "BETA": "B", "EPSILON": "E", "ZETA": "Z", "ETA": "H", "IOTA": "I", "KAPPA": "K",
                "MU": "M", "NU": "N", "OMICRON": "O", "RHO": "P", "TAU": "T", "CHI": "X"}
_GREEK_SPELLING = {"LAMDA": "LAMBDA", "FINAL SIGMA": "VARSIGMA"}


def _latex_char(ch: str) -> str:
    if ch in _LATEX_ESCAPES:
        return _LATEX_ESCAPES[ch]
    if ch.isascii() or "\u00a0" <= ch <= "\u017f":
        return ch          # ASCII, or a Latin-1 / Latin Extended-A letter that UTF-8 input handles
    name = unicodedata.name(ch, "")
    match = re.fullmatch(r"GREEK (SMALL|CAPITAL) LETTER ([A-Z ]+)", name)
    if match:
        case, letter = match.groups()
        letter = _GREEK_SPELLING.get(letter, letter)
        if letter == "OMICRON":
            return "o" if case == "SMALL" else "O"
        if case == "SMALL" and " " not in letter:
            return f"$\\{letter.lower()}$"
        if case == "CAPITAL" and letter in _GREEK_LATIN:
            return _GREEK_LATIN[letter]
        if case == "CAPITAL" and " " not in letter:
            return f"$\\{letter.capitalize()}$"
    ascii_form = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
    return escape_latex(ascii_form) if ascii_form else f"[U+{ord(ch):04X}]"


def escape_latex(text: str) -> str:
    """Text-mode LaTeX for an arbitrary label that pdflatex compiles: the ten special characters
    escaped, the symbols our labels use (→, ±, ×, δ, ‖ ...) and Greek letters mapped to math
    commands, Latin-1 letters passed through (UTF-8 input), anything else replaced by its ASCII
    compatibility form (₂ → 2) or, failing that, by a visible ``[U+XXXX]`` rather than breaking
    the build."""
    return "".join(_latex_char(ch) for ch in str(text))


def _latex_number(text: str, pm: str | None, bold: bool) -> str:
    body = f"{text} \\pm {pm}" if pm is not None else text
    return f"$\\mathbf{{{body}}}$" if bold else f"${body}$"


def to_latex(table: Table, *, label: str | None = None, float_env: bool = True, standalone: bool = False) -> str:
    """A booktabs tabular (\\toprule / \\midrule / \\bottomrule), label columns left-aligned and
    numbers right-aligned in math mode (true minus signs), best entries bold; wrapped in a
    ``table`` float with the caption and ``label`` unless ``float_env`` is False. The preamble needs
    ``\\usepackage{booktabs}``; ``standalone`` returns a whole compilable article instead."""
    spec = "l" * len(table.row_names) + "r" * len(table.columns)
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(escape_latex(c) for c in table.row_names + table.columns) + " \\\\", "\\midrule"]
    for i in range(len(table.rows)):
        cells = [escape_latex(table.label(i, k)) for k in range(len(table.row_names))]
        for j in range(len(table.columns)):
            text, pm = table.cell(i, j)
            cells.append(escape_latex(text) if pm is None and not math.isfinite(table.values[i, j])
                         else _latex_number(text, pm, bool(table.best[i, j])))
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if float_env:
        head = ["\\begin{table}[htbp]", "\\centering"]
        if table.caption:
            head.append(f"\\caption{{{escape_latex(table.caption)}}}")
        if label:
            head.append(f"\\label{{{_latex_label(label)}}}")
        lines = head + lines + ["\\end{table}"]
    if standalone:
        lines = ["\\documentclass{article}", "\\usepackage{booktabs}",
                 "\\begin{document}", *lines, "\\end{document}"]
    return "\n".join(lines) + "\n"


def _latex_label(label: str) -> str:
    # \label keys may not contain the special characters; keep a readable subset.
    return "".join(ch if ch.isalnum() or ch in ":-." else "-" for ch in label)


# -- HTML ---------------------------------------------------------------------------------------
def to_html(table: Table, *, table_id: str | None = None) -> str:
    """A self-contained ``<table>`` with a ``<caption>``, header cells with scope, every label
    escaped, best entries in ``<strong>``, and ``n`` (when known) as the entry's tooltip."""
    identifier = f' id="{html.escape(table_id, quote=True)}"' if table_id else ""
    lines = [f"<table{identifier}>"]
    if table.caption:
        lines.append(f"<caption>{html.escape(table.caption)}</caption>")
    lines.append("<thead><tr>" + "".join(f'<th scope="col">{html.escape(c)}</th>'
                                         for c in table.row_names + table.columns) + "</tr></thead>")
    lines.append("<tbody>")
    for i in range(len(table.rows)):
        cells = [f'<th scope="row">{html.escape(table.label(i, k))}</th>' for k in range(len(table.row_names))]
        for j in range(len(table.columns)):
            text, pm = table.cell(i, j)
            text = html.escape(f"{text} ± {pm}" if pm is not None else text)
            if table.best[i, j]:
                text = f"<strong>{text}</strong>"
            count = table.counts[i, j]
            title = f' title="n = {int(count)}"' if math.isfinite(count) else ""
            cells.append(f'<td style="text-align:right"{title}>{text}</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines) + "\n"


# -- grids of already formatted cells -----------------------------------------------------------
def grid_latex(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A booktabs tabular of already formatted cells (first column left-aligned, the rest right),
    every cell escaped, for tables whose cells are not one number each (e.g. the merge table)."""
    lines = [f"\\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}", "\\toprule",
             " & ".join(escape_latex(c) for c in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(escape_latex(c) for c in row) + " \\\\" for row in rows]
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"


def grid_html(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A ``<table>`` of already formatted cells, every cell escaped."""
    lines = ["<table>", "<thead><tr>" + "".join(f'<th scope="col">{html.escape(c)}</th>' for c in header)
             + "</tr></thead>", "<tbody>"]
    lines += ["<tr>" + f'<th scope="row">{html.escape(row[0])}</th>'
              + "".join(f'<td style="text-align:right">{html.escape(c)}</td>' for c in row[1:]) + "</tr>"
              for row in rows]
    return "\n".join(lines + ["</tbody>", "</table>"]) + "\n"
