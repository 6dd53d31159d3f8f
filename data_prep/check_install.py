r"""Checks an installation against the shipped model's reference outputs.

  python -m data_prep.check_install            # or: calcjax-check-install, make check-install
  python -m data_prep.check_install --write    # regenerate the reference (for a new shipped model)

Generates a fixed phantom set (``data_prep.phantom``: seed 2026, cardiac scans 1-4 aiming at risk
categories I-IV, 256 x 256, 45-50 slices each: the same bytes on every machine; chest scans have 5 times
the slices and would make the check slow), scores it with the shipped model and the
scorer's defaults (``calcjax.score``, heart region on), and compares each scan's row with
``calcjax/model/shipped/reference_scores.csv`` (which travels with the installed package): Agatston total and
per artery, and volume, within ``REL_TOL`` of the reference or ``ABS_TOL`` (the larger), the risk category and
slice count exactly. Prints ``ok`` and exits 0, or names every difference and exits 1. The tolerance
leaves room for the last bits of float arithmetic that differ between CPUs and XLA builds; a wrong
install, another model or a changed scoring rule is far outside it.

The calcjax library does not import ``data_prep`` (the phantom generator lives here), hence this module's
place; it is a program of the installed package like the others.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile

from absl import flags

from calcjax.core import cli
from calcjax.model import files as model_file

REFERENCE = os.path.join(model_file.MODELS_DIR, "reference_scores.csv")
SEED, SCANS, SIZE = 2026, (1, 2, 3, 4), 256
SALT = "calcjax-reference-outputs"
COLUMNS = (
    "scan_id",
    "protocol",
    "num_slices",
    "agatston",
    "agatston_LM",
    "agatston_LAD",
    "agatston_LCX",
    "agatston_RCA",
    "volume_mm3",
    "risk_category",
)
EXACT = ("scan_id", "protocol", "num_slices", "risk_category")
REL_TOL, ABS_TOL = 0.02, 0.5  # Agatston units / mm^3

_WRITE = flags.DEFINE_bool("write", False, "Write the reference instead of comparing with it.")


def reference_rows(workdir: str) -> list[dict]:
    """Generates the fixed phantom set under ``workdir`` and scores it with the shipped model: one dict
    per scan with :data:`COLUMNS`, in scan-id order."""
    from calcjax.score import cohort as score
    from calcjax.score.options import ScoreOptions
    from data_prep.phantom.generator import generate_scan, write_scan

    src = os.path.join(workdir, "phantoms")
    for i in SCANS:
        write_scan(generate_scan(SEED, i, "cardiac", size=SIZE), src, seed=SEED, index=i)
    salt_file = os.path.join(workdir, "salt.txt")
    with open(salt_file, "w") as f:
        f.write(SALT)
    out = os.path.join(workdir, "scored")
    score.score_cohort(
        ScoreOptions(
            checkpoint_path=None, out=out, dicom_dir=src, salt_file=salt_file, num_bootstrap=0, progress=False
        )
    )
    from calcjax.io import outputs

    rows = []
    for r in outputs.read_jsonl(os.path.join(out, "scores.jsonl")):
        per = r["agatston_per_artery"]
        rows.append(
            {
                "scan_id": r["scan_id"],
                "protocol": r["protocol"],
                "num_slices": int(r["num_slices"]),
                "agatston": float(r["agatston"]),
                **{f"agatston_{a}": float(per[a]) for a in ("LM", "LAD", "LCX", "RCA")},
                "volume_mm3": float(r["volume_mm3"]),
                "risk_category": int(r["risk_category"]),
            }
        )
    return sorted(rows, key=lambda row: row["scan_id"])


def read_reference(path: str = REFERENCE) -> list[dict]:
    """The reference rows of ``path`` (numbers parsed)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in COLUMNS:
            if key in ("num_slices", "risk_category"):
                row[key] = int(row[key])
            elif key not in ("scan_id", "protocol"):
                row[key] = float(row[key])
    return rows


def differences(got: list[dict], want: list[dict]) -> list[str]:
    """Every difference between computed and reference rows beyond the tolerances, one line each."""
    if [r["scan_id"] for r in got] != [r["scan_id"] for r in want]:
        here, there = [r["scan_id"] for r in got], [r["scan_id"] for r in want]
        return [f"scans differ: {here} here, {there} in the reference"]
    lines = []
    for g, w in zip(got, want, strict=True):
        for key in COLUMNS:
            a, b = g[key], w[key]
            same = a == b if key in EXACT else math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
            if not same:
                lines.append(f"{g['scan_id']} {key}: {a} here, {b} in the reference")
    return lines


def write_reference(rows: list[dict], path: str = REFERENCE) -> None:
    from calcjax.io.atomic import write_atomic

    lines = [",".join(COLUMNS)]
    for row in rows:
        lines.append(",".join(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in COLUMNS))
    write_atomic(path, "\n".join(lines) + "\n")


def main(argv) -> None:
    del argv
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        rows = reference_rows(tmp)
    if _WRITE.value:
        write_reference(rows)
        print(f"wrote {REFERENCE} ({len(rows)} scans)")
        return
    lines = differences(rows, read_reference())
    if lines:
        print("\n".join(["this installation differs from the reference outputs:", *lines]))
        raise SystemExit(1)
    print(f"ok: {len(rows)} phantom scans scored as in {REFERENCE}")


def run() -> None:
    """The console command ``calcjax-check-install``."""
    cli.run_command("calcjax-check-install", "data_prep.check_install", __doc__, main)


if __name__ == "__main__":
    run()
