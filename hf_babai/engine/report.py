"""Reporting: the per-layer records, the live table the CLI prints, and ``quant_log.csv``.

The columns are those of :class:`hf_babai.solver.LayerStats` after ``block, layer, out, in, tokens``; their meaning
is listed in ``docs/usage.md`` ("The per-layer log").
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: the block index of a Linear outside the language model (a vision tower's, rounded to nearest: no calibration)
TOWER_BLOCK = -1


@dataclass
class LayerRecord:
    block: int
    name: str
    out_features: int
    in_features: int
    tokens: int
    stats: dict[str, float | int | str] = field(default_factory=dict)

    def row(self) -> dict[str, float | int | str]:
        return {
            "block": self.block,
            "layer": self.name,
            "out": self.out_features,
            "in": self.in_features,
            "tokens": self.tokens,
            **self.stats,
        }


LAYER_TABLE_HEADER = (
    f"{'block':>5} {'layer':<22} {'out':>6} {'in':>6} {'loss':>11} {'bound':>11} {'clip%':>6} {'rank':>6} {'sec':>6}"
)


def log_layer(rec: LayerRecord) -> None:
    """One row of the live per-layer table (logger ``hf_babai.engine``, level INFO; the CLI shows it)."""
    if not log.isEnabledFor(logging.INFO):
        return
    st = rec.stats
    clip = 100.0 * float(st["clipped"]) / max(1, int(st["weights"]))
    log.info(
        "%5d %-22s %6d %6d %11.4g %11.4g %6.2f %6s %6.2f",
        rec.block,
        rec.name[-22:],
        rec.out_features,
        rec.in_features,
        st["loss"],
        st["bound"],
        clip,
        st["rank"],
        st["seconds"],
    )


def write_log(records: list[LayerRecord], path: str | Path) -> None:
    """The per-layer table as CSV (one row per quantized Linear)."""
    rows = [r.row() for r in records]
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
