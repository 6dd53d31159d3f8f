"""The heart-region stage (calcjax.inference.heart_region): what it keeps, what it removes, what it costs.

  python bench/heart_region.py [--scans 4] [--size 512] [--real $CALCJAX_REAL_DATA]

On ``--scans`` phantoms (cardiac and chest alternating, ``--size`` x ``--size``) and, where the real COCA
sample is at hand, on its 5 scans: one JSON line per scan with the fraction of reference calcium voxels
(label > 0 and HU >= 130) the region keeps (the aim: 1.0), the fraction of other >= 130 HU voxels it
keeps (bone, confounders, noise; lower is better), the region's share of the grid, its seconds, and the
seconds of the shipped model's forward pass over the same scan in the same process (``ratio_to_forward``
= region seconds / forward seconds: what the stage adds to scoring), and the seconds of the optional step
after it, ``calcjax.inference.lesion_completion`` of the model's prediction in the region at
``--completion_mm2`` (``completion_ratio_to_forward``). A last line per source sums them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _scans(args):
    """(source, protocol, hu, labels or None, spacing) for the phantoms, then the real sample."""
    from data_prep.phantom.generator import generate_scan

    for i in range(args.scans):
        protocol = "cardiac" if i % 2 == 0 else "chest"
        scan = generate_scan(5, i, protocol, size=args.size, target_category=1 + i % 4)
        yield "phantom", protocol, scan.hu, scan.label, scan.grid.spacing
    coca = os.path.join(args.real, "coca-sample")
    if os.path.isdir(coca):
        from calcjax.data import scan_sources

        scans, _ = scan_sources.dicom_scans(coca, context=1, salt="bench-heart-region-salt")
        for s in scans:
            loaded = s.load()
            yield "real", loaded.meta["protocol"], loaded.hu, loaded.labels, loaded.grid.spacing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=4, help="phantom scans (cardiac, chest alternating)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--completion_mm2", type=float, default=40.0, help="lesion completion's cap (mm^2)")
    parser.add_argument(
        "--real", default=os.environ.get("CALCJAX_REAL_DATA") or os.path.join(ROOT, "..", "shared", "data")
    )
    args = parser.parse_args()
    from absl import logging

    from calcjax.core.agatston import CALCIUM_THRESHOLD_HU
    from calcjax.inference import heart_region, lesion_completion
    from calcjax.inference import predictor as inference
    from calcjax.model import checkpoint

    logging.set_verbosity(logging.ERROR)
    _, model = checkpoint.load_for_inference(None)  # the shipped model
    predictor = inference.Predictor(model, batch_size=8)
    totals: dict[str, dict] = {}
    for source, protocol, hu, labels, spacing in _scans(args):
        predictor.predict(hu[: predictor.batch_size])  # compiled for this grid before timing
        t0 = time.perf_counter()
        pred = predictor.predict(hu)
        forward_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        region = heart_region.heart_region(hu, spacing)
        region_s = time.perf_counter() - t0
        kept = heart_region.restrict(pred, region)
        t0 = time.perf_counter()
        lesion_completion.complete_lesions(kept, hu, spacing, args.completion_mm2)
        completion_s = time.perf_counter() - t0
        bright = hu >= CALCIUM_THRESHOLD_HU
        calcium = bright & (labels > 0) if labels is not None else np.zeros_like(bright)
        others = bright & ~calcium
        line = {
            "bench": "heart_region",
            "source": source,
            "protocol": protocol,
            "slices": int(hu.shape[0]),
            "found": region.found,
            "calcium_voxels": int(calcium.sum()),
            "calcium_kept": round(float((calcium & region.mask).sum() / calcium.sum()), 4)
            if calcium.any()
            else None,
            "other_bright_kept": round(float((others & region.mask).sum() / max(others.sum(), 1)), 4),
            "region_fraction": round(float(region.mask.mean()), 4),
            "region_s": round(region_s, 3),
            "forward_s": round(forward_s, 3),
            "ratio_to_forward": round(region_s / forward_s, 3),
            "completion_s": round(completion_s, 3),
            "completion_ratio_to_forward": round(completion_s / forward_s, 3),
        }
        print(json.dumps(line), flush=True)
        t = totals.setdefault(
            source,
            {
                "scans": 0,
                "calcium": 0,
                "calcium_kept": 0,
                "region_s": 0.0,
                "forward_s": 0.0,
                "completion_s": 0.0,
            },
        )
        t["scans"] += 1
        t["calcium"] += int(calcium.sum())
        t["calcium_kept"] += int((calcium & region.mask).sum())
        t["region_s"] += region_s
        t["forward_s"] += forward_s
        t["completion_s"] += completion_s
    for source, t in totals.items():
        print(
            json.dumps(
                {
                    "bench": "heart_region",
                    "source": source,
                    "summary": True,
                    "scans": t["scans"],
                    "calcium_kept": round(t["calcium_kept"] / max(t["calcium"], 1), 4),
                    "region_s_per_scan": round(t["region_s"] / t["scans"], 3),
                    "ratio_to_forward": round(t["region_s"] / t["forward_s"], 3),
                    "completion_s_per_scan": round(t["completion_s"] / t["scans"], 3),
                    "completion_ratio_to_forward": round(t["completion_s"] / t["forward_s"], 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
