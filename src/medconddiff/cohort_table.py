"""One table for a cohort: every scan's class volumes, how far it got, and why it failed.

``medconddiff segment`` of a folder (or of several scans, or ``--all-series``) writes
:data:`TABLE_NAME` into the output folder beside the labels: one row per scan, one column of
millilitres per foreground class of the model, read from each scan's sidecar, so that a resumed
cohort (``--skip-existing``) tables the scans it skipped as well as those it segmented. The rows hold
what the sidecars hold (file names, series numbers and descriptions): no patient attribute.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .atomic import atomic_write

__all__ = ["TABLE_NAME", "ScanOutcome", "table_path", "write_cohort_table"]

#: The cohort table's file name (distinct from any labels file: those end in .nii.gz or .dcm).
TABLE_NAME = "medconddiff_volumes.csv"

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass(frozen=True)
class ScanOutcome:
    """What became of one scan of a cohort: ``status`` is done, skipped (its outputs existed) or failed;
    ``error`` says why it failed, or why a scan was skipped with its outputs incomplete."""

    scan: str
    labels: Path
    sidecar: Path
    status: str
    error: str = ""


def table_path(folder: Path) -> Path:
    """Where a cohort writes its table: :data:`TABLE_NAME` in ``folder``, one per rank under torchrun
    (each rank segments and tables its own share)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        return folder / f"{Path(TABLE_NAME).stem}.rank{int(os.environ.get('RANK', 0))}.csv"
    return folder / TABLE_NAME


def write_cohort_table(path: Path, outcomes: Sequence[ScanOutcome], class_names: Sequence[str], *,
                       overwrite: bool = False) -> Path:
    """Write one row per scan (atomically): scan, labels file, status, slices segmented, whether the
    scan is complete, seconds, then ``<class> ml`` for each foreground class and a note (why a scan
    failed, or that its sidecar could not be read)."""
    foreground = list(class_names[1:])
    columns = ["scan", "labels", "status", "slices", "complete", "seconds"] + [f"{name} ml" for name in foreground] \
        + ["note"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for outcome in outcomes:
        record, note = (None, outcome.error) if outcome.status == FAILED else _sidecar(outcome.sidecar)
        note = outcome.error or note        # a scan skipped for a file in its way says which
        row = [outcome.scan, outcome.labels.name, outcome.status]
        if record is None:
            row += ["", "", ""] + [""] * len(foreground)
        else:
            volumes = record.get("class_volumes", {})
            row += [len(record.get("slices", [])), record.get("complete", ""), record.get("seconds", "")]
            row += [_ml(volumes.get(name)) for name in foreground]
        writer.writerow(row + [note])
    text = buffer.getvalue()

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return atomic_write(path, write, overwrite=overwrite, suffix=".csv")


def _sidecar(path: Path) -> tuple[Optional[dict], str]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except (OSError, ValueError) as error:
        return None, f"sidecar {path.name} not readable ({type(error).__name__})"


def _ml(volume: Optional[dict]) -> str:
    return "" if not volume else f"{float(volume['ml']):.3f}"
