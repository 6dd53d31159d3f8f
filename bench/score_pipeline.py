"""The pipelined scorer against the serial one, on real chest scans (``python bench/score.py --pipeline``).

  python bench/score.py --pipeline [--real $CALCJAX_REAL_DATA] [--copies 3] [--host_copies 8] [--workers 2] \
      [--dicom DIR --limit N]

Input: the visible real chest scans (``coca-sample/deidentified_nongated``; each series copied ``--copies``
times under new UIDs, so that a cohort has enough scans to fill the pipeline), or, without the real data,
four 512x512 chest phantoms; with ``--dicom``, the first ``--limit`` scan folders of DIR (the device run
gives its phantoms). The shipped model, compiled once beforehand for every shape the runs meet
(each scan's whole slice and its heart boxes' windows: ``compiled_shapes`` in the line), scores the
same DICOM folder with the same salt:

- ``serial``: ``workers`` 0, the network on the whole slice (the scorer's defaults);
- ``serial_box``: ``workers`` 0, ``forward_in_heart_box``;
- ``pipelined``: ``--workers`` processes reading and preparing ahead, the whole slice;
- ``pipelined_box``: both.

One JSON line: ``scans_per_min`` of each and ``forward_share`` (the forward pass's seconds over the
run's); ``speedup`` = pipelined_box / serial (what a user gains with
both), ``speedup_pipeline`` = pipelined / serial and ``speedup_box`` = serial_box / serial (what each
bought); ``host_only_scaling``: the scans/min of the host work alone (the forward pass replaced by empty
labels) with ``--workers`` workers over one, on a cohort of its own (``--host_copies`` copies of each
series: the host work is cheap, and over a few scans the workers' start-up, paid once per cohort, would
weigh as much as the scans); ``scores_identical``: the pipelined rows equal the serial
ones (timing aside), and the same for the two box runs; ``box_label_changes``: voxels inside the heart
region whose label differs between the box and the whole slice (summed over scans, with the region's
voxel count), ``box_agatston_max_abs_diff`` per scan. Before it, one ``score_pipeline_run`` line per run
as it ends (what a run cut at a time limit keeps).
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np

VOLATILE = ("seconds",)


def copy_series(src: str, out: str, copies: int, limit: int = 0) -> int:
    """Every series folder under ``src`` (or under its first ``limit`` folders, sorted) written ``copies``
    times under ``out`` with new Study, Series and SOP Instance UIDs where it has them (derived from the old
    ones and the copy's number); the number of top folders copied."""
    import pydicom
    from pydicom.uid import generate_uid

    tops = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))[: limit or None]
    files = sorted(f for t in tops for f in glob.glob(os.path.join(src, t, "**", "*.dcm"), recursive=True))
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
    return len(tops)


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

    def predict_in_boxes(self, hu, boxes):
        return np.zeros(hu.shape, np.uint8)


def prepared_scans(predictor, dicom: str, salt: str):
    """``(scan, stages.Prepared)`` of every scan of ``dicom`` that can be prepared (heart region on)."""
    from calcjax.data import scan_sources
    from calcjax.io import deid
    from calcjax.score import stages

    scans, _ = scan_sources.dicom_scans(dicom, context=(predictor.in_channels - 1) // 2,
                                        salt=deid.read_salt_file(salt))  # fmt: skip
    for scan in scans:
        prepared = stages.prepare(scan, True, False)
        if isinstance(prepared, stages.Prepared):
            yield scan, prepared


def warm_up(predictor, dicom: str, salt: str) -> int:
    """Compiles the forward pass for every shape the runs meet (kept out of the timing): each scan's
    whole slice and its heart boxes' windows; how many shapes. Only the shapes met: at most 7 x 7 window
    shapes for 512x512 scans, but each compilation on an accelerator is seconds of a short session."""
    from calcjax.score import stages

    shapes = set()
    for _, prepared in prepared_scans(predictor, dicom, salt):
        shapes.add(prepared.loaded.hu.shape[1:])
        boxes = stages.heart_boxes(prepared.region, predictor.batch_size, predictor.multiple) or []
        shapes.update((b.y1 - b.y0, b.x1 - b.x0) for b in boxes)
    for h, w in sorted(shapes):
        predictor.predict(np.zeros((3, h, w), np.int16), (3.0, 0.7, 0.7))
    return len(shapes)


def timed_run(predictor, dicom: str, salt: str, out: str, **kw) -> tuple[float, list[dict], float]:
    """(scans/min, rows, the forward pass's share of the run's seconds) of one scoring run."""
    from calcjax.io import outputs
    from calcjax.score import cohort
    from calcjax.score.options import ScoreOptions

    options = ScoreOptions(out=out, dicom_dir=dicom, salt_file=salt, progress=False, num_bootstrap=0, **kw)
    t0, f0 = time.perf_counter(), predictor.forward_seconds
    summary = cohort.score_cohort(options, predictor=predictor)
    seconds = time.perf_counter() - t0
    share = (predictor.forward_seconds - f0) / seconds
    return 60 * summary["scored"] / seconds, outputs.read_jsonl(os.path.join(out, outputs.SCORES)), share


def box_label_changes(predictor, dicom: str, salt: str) -> dict:
    """Voxels inside each scan's heart region whose label differs between the box and the whole slice,
    and the largest per-scan difference in Agatston between the two runs' rows (reported by the caller)."""
    from calcjax.score import stages

    changed = region_voxels = 0
    for _, prepared in prepared_scans(predictor, dicom, salt):
        hu, spacing = prepared.loaded.hu, prepared.loaded.grid.spacing
        boxes = stages.heart_boxes(prepared.region, predictor.batch_size, predictor.multiple)
        whole = predictor.predict(hu, spacing)
        boxed = whole if boxes is None else predictor.predict_in_boxes(hu, boxes)
        inside = prepared.region.mask
        changed += int((whole[inside] != boxed[inside]).sum())
        region_voxels += int(inside.sum())
    return {"box_label_changes": changed, "heart_region_voxels": region_voxels}


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def cohort_folder(real: str, copies: int, out: str, dicom: str = "", limit: int = 0) -> str:
    """The real chest series (or the first ``limit`` scan folders of ``dicom``) copied ``copies`` times
    into ``out`` (without either, four chest phantoms written once beside ``out`` and copied the same way);
    what it holds."""
    if dicom:
        n = copy_series(dicom, out, copies, limit)
        return f"{n} scan folders of the given folder x {copies} copies"
    chest = os.path.join(real, "coca-sample", "deidentified_nongated")
    if os.path.isdir(chest):
        n = copy_series(chest, out, copies)
        return f"real chest scans ({n} x {copies} copies)"
    phantoms = os.path.join(os.path.dirname(out), "phantoms")
    if not os.path.isdir(phantoms):
        phantom_series(phantoms)
    copy_series(phantoms, out, copies)
    return f"512x512 chest phantoms (no real data found; 4 x {copies} copies)"


def run(real: str, copies: int, workers: int, tmp: str, host_copies: int = 8, dicom_in: str = "",
        limit: int = 0, emit=None) -> dict:  # fmt: skip
    """The bench's JSON line (module docstring); ``emit`` (if given) is handed each run's figures as it
    ends (``{"bench": "score_pipeline_run", ...}``), so that a bench cut at a time limit keeps them."""
    emit = emit or (lambda row: None)
    import jax

    from calcjax.inference.predictor import Predictor

    dicom, host_dicom = os.path.join(tmp, "dicom"), os.path.join(tmp, "host-dicom")
    source = cohort_folder(real, copies, dicom, dicom_in, limit)
    host_source = cohort_folder(real, host_copies, host_dicom, dicom_in, limit)
    salt = os.path.join(tmp, "salt.txt")
    with open(salt, "w") as f:
        f.write("bench-score-pipeline-salt-0123456789")
    predictor = Predictor.from_checkpoint(None)
    compiled_shapes = warm_up(predictor, dicom, salt)
    runs = {
        "serial": dict(workers=0),
        "serial_box": dict(workers=0, forward_in_heart_box=True),
        "pipelined": dict(workers=workers),
        "pipelined_box": dict(workers=workers, forward_in_heart_box=True),
    }
    rate, rows, share = {}, {}, {}
    for name, kw in runs.items():
        rate[name], rows[name], share[name] = timed_run(predictor, dicom, salt, os.path.join(tmp, name), **kw)
        emit({"bench": "score_pipeline_run", "run": name, "scans_per_min": round(rate[name], 3),
              "forward_share": round(share[name], 3)})  # fmt: skip
    host = {}
    for w in (1, workers):
        host[w] = timed_run(
            NoForward(predictor), host_dicom, salt, os.path.join(tmp, f"host-{w}"), workers=w
        )[0]
        emit({"bench": "score_pipeline_run", "run": f"host_only_{w}", "scans_per_min": round(host[w], 3)})
    agatston_diff = max(
        abs(a["agatston"] - b["agatston"]) for a, b in zip(rows["serial"], rows["serial_box"], strict=True)
    )
    return {
        "bench": "score_pipeline",
        "input": source,
        "scans": len(rows["serial"]),
        "workers": workers,
        "backend": jax.default_backend(),
        "compiled_shapes": compiled_shapes,
        **{f"{name}_scans_per_min": round(r, 3) for name, r in rate.items()},
        **{f"{name}_forward_share": round(f, 3) for name, f in share.items()},
        "speedup": round(rate["pipelined_box"] / rate["serial"], 3),
        "speedup_pipeline": round(rate["pipelined"] / rate["serial"], 3),
        "speedup_box": round(rate["serial_box"] / rate["serial"], 3),
        "host_only_input": host_source,
        "host_only_scans_per_min_1": round(host[1], 3),
        f"host_only_scans_per_min_{workers}": round(host[workers], 3),
        "host_only_scaling": round(host[workers] / host[1], 3),
        "scores_identical": _stable(rows["serial"]) == _stable(rows["pipelined"])
        and _stable(rows["serial_box"]) == _stable(rows["pipelined_box"]),
        **box_label_changes(predictor, dicom, salt),
        "box_agatston_max_abs_diff": round(agatston_diff, 3),
    }
