"""A seeded set of 10 full-size phantom scans covers both protocols, every risk category and weight band
(the generator's promise: any 10 consecutive scans cover both protocols and all five categories). It ran
20 scans until 2026-12-01, twice the time; seed 0 covers every category and band by its fifth scan."""

from __future__ import annotations

import pytest

from calcjax.core.agatston import density_weight
from data_prep.phantom.generator import generate_scan, protocol_of


@pytest.mark.slow
def test_ten_seeded_scans_cover_protocols_categories_and_weight_bands():
    protocols, categories, weights = set(), set(), set()
    for i in range(10):
        scan = generate_scan(0, i, protocol_of(i, "mixed"), size=512)
        ref = scan.truth["reference"]
        protocols.add(scan.acquisition.protocol)
        categories.add(ref["risk_category"])
        weights.update(int(density_weight(les["peak_hu"])) for les in scan.truth["lesions"] if les["peak_hu"])
        # Realism bounds from the protocol table (docs/background.md).
        acq = scan.acquisition
        if acq.protocol == "cardiac":
            assert 0.39 <= acq.pixel_mm <= 0.49 and acq.thickness_mm == acq.increment_mm == 3.0
            assert 120 <= acq.increment_mm * (acq.num_slices - 1) <= 150
        else:
            assert 0.66 <= acq.pixel_mm <= 0.79 and acq.increment_mm <= acq.thickness_mm
            assert 280 <= acq.increment_mm * (acq.num_slices - 1) <= 320
        assert (scan.hu < -700).mean() > 0.1  # lungs and air
        assert (scan.hu > 700).any()  # cortical bone
        sizes = [max(les["size_mm"]) for les in scan.truth["lesions"]]
        if sizes:
            assert max(sizes) <= 11.0 + 1e-6
    assert protocols == {"cardiac", "chest"}
    assert categories == {0, 1, 2, 3, 4}
    assert weights == {1, 2, 3, 4}
