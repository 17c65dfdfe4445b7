"""Writing a task's rows as JSON lines, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write atomically (temporary file, then rename): concurrent writers of the same file never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
