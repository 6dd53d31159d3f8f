"""A real scanner's known answer: the QRM calcification insert scanned on a Canon Aquilion ONE, found from HU
alone and scored by calcjax.core.agatston, against the source study's per-insert Agatston and mass and against
the inserts' physical masses (shared/data/qrm-canon/README)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from calcjax.data import qrm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("CALCJAX_REAL_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
QRM = os.path.join(REAL, "qrm-canon")
DENSITY_ROWS = {"Low Density": "low", "Medium Density": "medium", "High Density": "high"}

pytestmark = pytest.mark.skipif(
    not os.path.isdir(QRM), reason=f"real QRM phantom scan not found at {QRM} (set CALCJAX_REAL_DATA)"
)


def _source(name: str) -> dict:
    """``{(density, size): {column: value}}`` of the source study's ``Large_rep1`` rows (this scan)."""
    out = {}
    with open(os.path.join(QRM, name)) as f:
        for row in csv.DictReader(f):
            if row["scan"] != "Large_rep1":
                continue
            for size in ("large", "medium", "small"):
                out[(DENSITY_ROWS[row["inserts"]], size)] = {
                    k.replace(f"_{size}", ""): float(v) for k, v in row.items() if k.endswith(f"_{size}")
                } | {"mass_cal_factor": float(row.get("mass_cal_factor") or "nan")}
    return out


@pytest.fixture(scope="module")
def scored():
    from calcjax.io import dicom

    vol = dicom.read_series(os.path.join(QRM, "dicom"))
    rows = qrm.score_inserts(vol.hu.astype(np.float32), vol.spacing)
    return {(r["density"], r["size"]): r for r in rows}


def test_nine_inserts_found_and_agatston_matches_the_source_study(scored):
    source = _source("agatston.csv")
    assert len(scored) == 9
    for key, want in source.items():
        got, ref = scored[key]["agatston"], want["calculated_agat"]
        if key[1] == "large":  # measured: within 0.9%
            assert got == pytest.approx(ref, rel=0.02), key
        elif key[1] == "medium":  # measured: within 5.6% (high density: 84.3 against 89.3)
            assert got == pytest.approx(ref, rel=0.08), key
        elif ref == 0:  # 1 mm inserts of 200 and 400 mg/cm^3: below threshold or the 1 mm^2 limit
            assert got == 0.0, key
        else:  # the 1 mm 800 mg/cm^3 insert blooms past 1 mm^2 in both codes: 5.7 against 6.2
            assert got == pytest.approx(ref, abs=1.0), key


def test_mass_from_the_rod_calibration_matches_the_source_and_the_physical_masses(scored):
    source = _source("agatston.csv")
    factor = scored[("low", "large")]["mass_calibration"]
    # The source's factor is 0.000722 mg/(HU mm^3); the rod core gives 0.000691 here (4.3% lower).
    assert factor == pytest.approx(source[("low", "large")]["mass_cal_factor"], rel=0.06)
    for key, want in source.items():
        got = scored[key]
        assert got["physical_mass_mg"] == pytest.approx(want["ground_truth_mass"], abs=0.06), key
        if key[1] == "small":
            assert got["mass_mg"] == pytest.approx(want["calculated_mass"], abs=0.2), key
            continue
        # Same method, same scan: within 10% of the source's Agatston-based mass (measured <= 8%).
        assert got["mass_mg"] == pytest.approx(want["calculated_mass"], rel=0.10), key
        # Against the physical mass, threshold-based mass overestimates by blooming (source: +10 to +28%;
        # here +7 to +24%), never underestimates on these inserts.
        ratio = got["mass_mg"] / got["physical_mass_mg"]
        assert 1.0 < ratio < 1.3, (key, ratio)
