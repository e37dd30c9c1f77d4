"""Rows of a task split as JSON lines (one object per line), written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from methods.io.checkpoint import atomic_file


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
