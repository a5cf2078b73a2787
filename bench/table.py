"""Markdown table from ``bench/quality.py`` JSON lines (used for docs/benchmarks.md).

.venv/bin/python bench/table.py bench/results/quality_smollm2-135m.jsonl
"""

from __future__ import annotations

import json
import sys


def _fmt(v: object, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def main(paths: list[str]) -> None:
    cols = ["model", "tool", "method", "order", "bits", "group_size", "bpw", "ppl", "seconds", "peak_rss_gb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for path in paths:
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                row = [_fmt(rec.get(c), 3 if c in ("bpw", "ppl") else 1) for c in cols]
                print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
