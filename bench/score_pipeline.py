"""The pipelined scorer against the serial one, on real chest scans (``python bench/score.py --pipeline``).

  python bench/score.py --pipeline [--real $CALCJAX_REAL_DATA] [--copies 3] [--workers 2]

Input: the visible real chest scans (``coca-sample/deidentified_nongated``; each series copied ``--copies``
times under new UIDs, so that a cohort has enough scans to fill the pipeline), or, without the real data,
four 512x512 chest phantoms. The shipped model, compiled once beforehand for every shape the runs meet
(the whole slice and every heart-box size), scores the same DICOM folder with the same salt:

- ``serial``: ``workers`` 0, the network on the whole slice (the scorer's defaults);
- ``serial_box``: ``workers`` 0, ``forward_in_heart_box``;
- ``pipelined``: ``--workers`` processes reading and preparing ahead, the whole slice;
- ``pipelined_box``: both.

One JSON line: ``scans_per_min`` of each; ``speedup`` = pipelined_box / serial (what a user gains with
both), ``speedup_pipeline`` = pipelined / serial and ``speedup_box`` = serial_box / serial (what each
bought); ``host_only_scaling``: the scans/min of the host work alone (the forward pass replaced by empty
labels) with ``--workers`` workers over one; ``scores_identical``: the pipelined rows equal the serial
ones (timing aside), and the same for the two box runs; ``box_label_changes``: voxels inside the heart
region whose label differs between the box and the whole slice (summed over scans, with the region's
voxel count), ``box_agatston_max_abs_diff`` per scan.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np

VOLATILE = ("seconds",)


def copy_series(src: str, out: str, copies: int) -> None:
    """Every series folder under ``src`` written ``copies`` times under ``out`` with new Study, Series and
    SOP Instance UIDs where it has them (derived from the old ones and the copy's number)."""
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(f for f in glob.glob(os.path.join(src, "**", "*.dcm"), recursive=True))
    for k in range(copies):
        for f in files:
            ds = pydicom.dcmread(f)
            for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                if key in ds:  # a series without UIDs is grouped by its folder and geometry
                    setattr(ds, key, generate_uid(entropy_srcs=[str(getattr(ds, key)), str(k)]))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            rel = os.path.relpath(f, src)
            dst = os.path.join(out, f"copy-{k}", rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            ds.save_as(dst)


def phantom_series(out: str) -> None:
    """Four 512x512 chest phantoms written as DICOM (when the real scans are not at hand)."""
    from data_prep.phantom.generator import generate_scan, write_scan

    for i in range(4):
        write_scan(generate_scan(9, i, "chest", size=512, target_category=i + 1), out, seed=9, index=i)


class NoForward:
    """A predictor whose forward pass is empty labels (for the host work alone)."""

    def __init__(self, predictor):
        self.in_channels, self.mesh, self.multiple = predictor.in_channels, predictor.mesh, predictor.multiple
        self.pixel_mm, self.batch_size, self.forward_seconds = predictor.pixel_mm, predictor.batch_size, 0.0

    def predict(self, hu, spacing=None):
        return np.zeros(hu.shape, np.uint8)


def warm_up(predictor, shape: tuple[int, int]) -> None:
    """Compiles the forward pass for the whole slice and every heart-box size (kept out of the timing)."""
    from calcjax.score import stages

    sides = sorted({*[s for s in stages.BOX_SIDES_PX if s < min(shape)], *shape})
    for h in sides:
        for w in sides:
            if h <= shape[0] and w <= shape[1]:
                predictor.predict(np.zeros((3, h, w), np.int16), (3.0, 0.7, 0.7))


def timed_run(predictor, dicom: str, salt: str, out: str, **kw) -> tuple[float, list[dict]]:
    """(scans/min, rows) of one scoring run."""
    from calcjax.io import outputs
    from calcjax.score import cohort
    from calcjax.score.options import ScoreOptions

    options = ScoreOptions(out=out, dicom_dir=dicom, salt_file=salt, progress=False, num_bootstrap=0, **kw)
    t0 = time.perf_counter()
    summary = cohort.score_cohort(options, predictor=predictor)
    seconds = time.perf_counter() - t0
    return 60 * summary["scored"] / seconds, outputs.read_jsonl(os.path.join(out, outputs.SCORES))


def box_label_changes(predictor, dicom: str, salt: str) -> dict:
    """Voxels inside each scan's heart region whose label differs between the box and the whole slice,
    and the largest per-scan difference in Agatston between the two runs' rows (reported by the caller)."""
    from calcjax.data import scan_sources
    from calcjax.io import deid
    from calcjax.score import stages

    scans, _ = scan_sources.dicom_scans(dicom, context=(predictor.in_channels - 1) // 2,
                                        salt=deid.read_salt_file(salt))  # fmt: skip
    changed = region_voxels = 0
    for scan in scans:
        prepared = stages.prepare(scan, True, False)
        hu, spacing = prepared.loaded.hu, prepared.loaded.grid.spacing
        box = stages.heart_box(prepared.region, (predictor.in_channels - 1) // 2, predictor.multiple)
        whole = predictor.predict(hu, spacing)
        boxed = whole if box is None else stages.forward_in_box(predictor.predict, hu, spacing, box)
        inside = prepared.region.mask
        changed += int((whole[inside] != boxed[inside]).sum())
        region_voxels += int(inside.sum())
    return {"box_label_changes": changed, "heart_region_voxels": region_voxels}


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def run(real: str, copies: int, workers: int, tmp: str) -> dict:
    """The bench's JSON line (module docstring)."""
    import jax

    from calcjax.inference.predictor import Predictor

    chest = os.path.join(real, "coca-sample", "deidentified_nongated")
    dicom = os.path.join(tmp, "dicom")
    if os.path.isdir(chest):
        copy_series(chest, dicom, copies)
        source = f"real chest scans ({len(os.listdir(chest)) - 2} x {copies} copies)"
    else:
        phantom_series(dicom)
        source = "512x512 chest phantoms (no real data found)"
    salt = os.path.join(tmp, "salt.txt")
    with open(salt, "w") as f:
        f.write("bench-score-pipeline-salt-0123456789")
    predictor = Predictor.from_checkpoint(None)
    warm_up(predictor, (512, 512))
    runs = {
        "serial": dict(workers=0),
        "serial_box": dict(workers=0, forward_in_heart_box=True),
        "pipelined": dict(workers=workers),
        "pipelined_box": dict(workers=workers, forward_in_heart_box=True),
    }
    rate, rows = {}, {}
    for name, kw in runs.items():
        rate[name], rows[name] = timed_run(predictor, dicom, salt, os.path.join(tmp, name), **kw)
    host = {w: timed_run(NoForward(predictor), dicom, salt, os.path.join(tmp, f"host-{w}"), workers=w)[0]
            for w in (1, workers)}  # fmt: skip
    agatston_diff = max(
        abs(a["agatston"] - b["agatston"]) for a, b in zip(rows["serial"], rows["serial_box"], strict=True)
    )
    return {
        "bench": "score_pipeline",
        "input": source,
        "scans": len(rows["serial"]),
        "workers": workers,
        "backend": jax.default_backend(),
        **{f"{name}_scans_per_min": round(r, 3) for name, r in rate.items()},
        "speedup": round(rate["pipelined_box"] / rate["serial"], 3),
        "speedup_pipeline": round(rate["pipelined"] / rate["serial"], 3),
        "speedup_box": round(rate["serial_box"] / rate["serial"], 3),
        "host_only_scans_per_min_1": round(host[1], 3),
        f"host_only_scans_per_min_{workers}": round(host[workers], 3),
        "host_only_scaling": round(host[workers] / host[1], 3),
        "scores_identical": _stable(rows["serial"]) == _stable(rows["pipelined"])
        and _stable(rows["serial_box"]) == _stable(rows["pipelined_box"]),
        **box_label_changes(predictor, dicom, salt),
        "box_agatston_max_abs_diff": round(agatston_diff, 3),
    }
