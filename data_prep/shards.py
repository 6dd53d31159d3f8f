"""Turns scans into 2.5D-stack records and writes whole ArrayRecord shards atomically.

A shard is written under a temporary name, then its sidecar (``.<shard>.json``: per-scan metadata,
record ranges, errors) and the shard are renamed into place; a shard counts as done only when both exist,
so a build killed at any point resumes by redoing the unfinished shards and never leaves a half-written
one under a final name. All slices of a scan are contiguous in one shard, in z order.
"""

from __future__ import annotations

import json
import os

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from calcjax.core import agatston
from calcjax.io import dicom, labels, preprocess, records
from calcjax.io.discover import ScanJob

ARRAY_RECORD_OPTIONS = "group_size:1,zstd:1"  # one record per chunk: random access by index


def sidecar_path(shard_path: str) -> str:
    folder, name = os.path.split(shard_path)
    return os.path.join(folder, f".{name}.json")


def shard_done(shard_path: str, fingerprint: str | None = None) -> bool:
    """A finished shard: it and its sidecar exist, and the sidecar's ``fingerprint`` (of the scans and
    settings the shard was written from, ``data_prep.builder``) is ``fingerprint`` when one is given."""
    if not (os.path.isfile(shard_path) and os.path.isfile(sidecar_path(shard_path))):
        return False
    if fingerprint is None:
        return True
    try:
        with open(sidecar_path(shard_path)) as f:
            return json.load(f).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def scan_records(scan_id: str, vol: dicom.Volume, lab: np.ndarray | None, context: int):
    """Yields the encoded records of one scan, slice by slice in z order."""
    hu = preprocess.hu_int16(vol.hu)
    nz = hu.shape[0]
    for k in range(nz):
        label_k = None if lab is None else lab[k]
        yield records.encode(
            {
                "scan_id": scan_id,
                "slice_index": k,
                "num_slices": nz,
                "image": hu[records.stack_indices(k, nz, context)],
                "label": label_k,
                "spacing": vol.spacing,
                "slice_thickness": vol.meta["slice_thickness_mm"],
                "protocol": vol.meta["protocol"],
                "kvp": vol.meta["kvp"],
                "has_calcium": bool(label_k is not None and label_k.any()),
            }
        )


def scan_metadata(job: ScanJob, vol: dicom.Volume, lab: np.ndarray | None) -> dict:
    meta = dict(vol.meta)
    meta.update(scan_id=job.scan_id, split=job.split, spacing=list(vol.spacing), labelled=lab is not None)
    meta.update(preprocess.grid_metadata(vol.grid))
    meta["label_format"] = job.label_format
    meta["series_grouping"] = job.grouping
    if lab is not None:
        ref = agatston.score(vol.hu, lab, vol.spacing)
        meta["calcium_slices"] = np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1)).tolist()
        meta["reference"] = {
            "agatston": ref["agatston"],
            "agatston_per_artery": ref["agatston_per_artery"],
            "volume_mm3": ref["volume_mm3"],
            "risk_category": ref["risk_category"],
        }
    return meta


def _error(job: ScanJob, e: Exception) -> dict:
    reason = job.safe_reason(e)
    if job.shared_folder > 1 and isinstance(e, labels.LabelGridError):
        reason += f" ({job.shared_folder} series share this folder; the label belongs to another one)"
    return {
        "input": job.scan_id,
        "stage": "read",
        "kind": getattr(e, "kind", e.__class__.__name__),
        "reason": reason,
        "scan_id": job.scan_id,
    }


def write_shard(
    shard_path: str,
    jobs: list[ScanJob],
    *,
    context: int,
    protocol: str | None,
    fingerprint: str | None = None,
    reslice_mm: float = 0.0,
) -> dict:
    """Writes one shard of the records of ``jobs`` (bad scans skipped; each read as ``reslice_mm`` thick
    slices when > 0) and its sidecar (which keeps ``fingerprint``); returns the sidecar."""
    tmp = f"{shard_path}.tmp-{os.getpid()}"
    scans, errors, count = [], [], 0
    writer = ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
    try:
        for job in jobs:
            # Every stage that can fail on one scan (reading, labels, the reference Agatston, encoding)
            # runs before any of its records is written, so a failure leaves the shard without a trace of
            # the scan and becomes its errors line; the build goes on.
            try:
                vol, lab = preprocess.read_scan(
                    job.files, label_path=job.label_path, label_format=job.label_format, protocol=protocol,
                    reslice_mm=reslice_mm,
                )  # fmt: skip
                meta = scan_metadata(job, vol, lab)
                encoded = list(scan_records(job.scan_id, vol, lab, context))
            except Exception as e:  # a batch job records every bad scan and goes on
                errors.append(_error(job, e))
                continue
            start = count
            for rec in encoded:
                writer.write(rec)
                count += 1
            meta.update(shard=os.path.basename(shard_path), record_start=start, num_records=count - start)
            scans.append(meta)
    finally:
        writer.close()
    sidecar = {
        "shard": os.path.basename(shard_path),
        "num_records": count,
        "scans": scans,
        "errors": errors,
        "fingerprint": fingerprint,
    }
    side_tmp = sidecar_path(shard_path) + f".tmp-{os.getpid()}"
    with open(side_tmp, "w") as f:
        json.dump(sidecar, f)
    os.replace(tmp, shard_path)
    os.replace(side_tmp, sidecar_path(shard_path))
    return sidecar
