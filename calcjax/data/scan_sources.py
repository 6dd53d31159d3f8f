"""Where the scorer's scans come from: shard records, DICOM series or NIfTI volumes, as one :class:`ScanInput`
type.

Both routes end in the same arrays: int16 HU ``hu`` ``(Z, H, W)`` (``calcjax.io.preprocess``; the
predictor builds the 2.5D stacks from it batch by batch, by the rule the records were written with),
reference ``labels`` uint8 ``(Z, H, W)`` or None, the scan's grid and metadata. A scan is *listed*
cheaply (ids and where it lies) and *loaded* one at a time by ``load()``, so the scorer never holds more
than one scan; a scan that cannot be loaded raises an error naming it.

- :func:`shard_scans`: the scans of the shard files matching a glob (their folder's manifest,
  ``calcjax.io.shards``, says where each scan's records lie; a scan is contiguous in one shard, in z order).
- :func:`dicom_scans`: every CT series under a folder (``calcjax.io.discover``), read with
  ``calcjax.io.preprocess.read_scan`` exactly as ``data_prep.build`` reads it, with the labels it finds.
- :func:`nifti_scans`: every ``*.nii`` / ``*.nii.gz`` CT volume in HU under a folder
  (``calcjax.io.nifti``), without labels.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Callable

import numpy as np

from calcjax.io import discover, geometry, nifti, preprocess, shards
from calcjax.io.dicom_series import OUTPUT_FOLDER_MARKER
from calcjax.io.errors import reason_of


@dataclasses.dataclass(frozen=True)
class LoadedScan:
    """One scan in memory. ``meta``: protocol, kvp, slice thickness/increment (no identifying value).
    ``source_files``: DICOM route, the series' files in z order (in memory only: for DICOM outputs)."""

    hu: np.ndarray
    labels: np.ndarray | None
    grid: geometry.Grid
    meta: dict
    source_files: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ScanInput:
    """A listed scan: ``scan_id``, ``source`` (a shard file name, or ``dicom``: no path text), ``load()``,
    and ``reason_of(error)``: the reason of an error about it, safe to write (no header value, no path)."""

    scan_id: str
    source: str
    load: Callable[[], LoadedScan]
    reason_of: Callable[[Exception], str] = reason_of
    folder: str | None = None  # DICOM route: the series folder (in memory only, for reference matching)


def load_shard_scan(reader, scan: shards.ScanEntry, context: int) -> LoadedScan:
    """Decodes one manifest scan (``calcjax.io.shards.read_scan``: a RecordError names the shard, the
    record and the scan)."""
    hu, labels = shards.read_scan(reader, scan, context)
    meta = {
        "protocol": scan.protocol,
        "kvp": scan.meta.get("kvp"),
        "slice_thickness_mm": scan.meta.get("slice_thickness_mm"),
        "slice_increment_mm": scan.spacing[0],
        "series_grouping": scan.meta.get("series_grouping", "uid"),
    }
    return LoadedScan(hu, labels, preprocess.scan_grid(scan.meta, hu.shape), meta)


def shard_scans(pattern: str, *, context: int) -> tuple[list[ScanInput], shards.Readers]:
    """The scans of the shard files matching ``pattern``, in manifest order, and their readers."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shard file matches {pattern!r}")
    readers = shards.Readers()
    out = []
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        manifest = shards.Manifest.read(folder)
        if manifest.context != context:
            raise ValueError(
                f"{folder} was built with {2 * manifest.context + 1} adjacent slices per record; the model "
                f"takes {2 * context + 1}: rebuild the shards with --context {context} or use another "
                "checkpoint"
            )
        wanted = {os.path.basename(p) for p in paths if os.path.dirname(os.path.abspath(p)) == folder}
        for scan in manifest.scans:
            if scan.shard not in wanted:
                continue
            path = os.path.join(folder, scan.shard)
            load = functools.partial(_load_from_shard_file, readers, path, scan, context)
            out.append(ScanInput(scan_id=scan.scan_id, source=scan.shard, load=load))
    return out, readers


def _load_from_shard_file(readers: shards.Readers, path: str, scan: shards.ScanEntry, context: int):
    """:func:`load_shard_scan` through ``readers`` (a copy sent to another process opens its own)."""
    return load_shard_scan(readers.get(path), scan, context)


def dicom_scans(
    root: str,
    *,
    context: int,
    salt: str,
    labels_dir: str | None = None,
    protocol: str | None = None,
    exclude=(),
    private_map: dict[str, str] | None = None,
) -> tuple[list[ScanInput], list[dict]]:
    """The CT series under ``root`` as scans (ids: salted hashes), and error entries for what is not
    (``exclude`` and ``private_map``: as ``calcjax.io.discover.discover``)."""
    jobs, errors = discover.discover(
        root,
        salt=salt,
        split=[("score", 1.0)],
        split_seed=0,
        labels_dir=labels_dir,
        exclude=exclude,
        private_map=private_map,
    )

    scans = [
        ScanInput(
            j.scan_id,
            "dicom",
            functools.partial(load_dicom_scan, j, protocol),
            j.safe_reason,
            os.path.commonpath([os.path.dirname(f) for f in j.files]),
        )
        for j in jobs
    ]
    return scans, errors


def load_dicom_scan(job: discover.ScanJob, protocol: str | None = None) -> LoadedScan:
    """One discovered series (and its labels, if any) as int16 HU on its grid."""
    vol, lab = preprocess.read_scan(
        job.files, label_path=job.label_path, label_format=job.label_format, protocol=protocol
    )
    hu = preprocess.hu_int16(vol.hu)
    meta = {k: vol.meta.get(k) for k in ("protocol", "kvp", "slice_thickness_mm", "slice_increment_mm")}
    meta["series_grouping"] = job.grouping
    return LoadedScan(hu, lab, vol.grid, meta, tuple(vol.source))


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def nifti_scans(
    root: str, *, salt: str, exclude=(), private_map: dict[str, str] | None = None
) -> tuple[list[ScanInput], list[dict]]:
    """The NIfTI CT volumes under ``root`` (sorted by path) as scans, their ids salted hashes of the path
    relative to ``root``; ``exclude`` and calcjax output folders are not searched; ``private_map`` receives
    ``scan_id -> relative path``. No listing errors: a bad file fails when it is loaded, naming the rule."""
    skip = [os.path.abspath(e) for e in exclude]
    found = []
    for dirpath, dirs, files in os.walk(root):
        if OUTPUT_FOLDER_MARKER in files:  # a calcjax output folder (its masks are labels, not CT)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(dirpath, d)) not in skip)
        found += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(NIFTI_SUFFIXES)]
    scans = []
    for path in sorted(found):
        rel = os.path.relpath(path, root)
        scan_id = discover.scan_id_of("nifti:" + rel, salt)
        if private_map is not None:
            private_map[scan_id] = rel
        scans.append(
            ScanInput(
                scan_id, "nifti", functools.partial(load_nifti_scan, path), folder=os.path.dirname(path)
            )
        )
    return scans, []


def load_nifti_scan(path: str) -> LoadedScan:
    """One NIfTI CT volume as int16 HU on its grid (``calcjax.io.nifti.read_ct_nifti``)."""
    vol = nifti.read_ct_nifti(path)
    meta = {**vol.meta, "series_grouping": "nifti"}
    return LoadedScan(preprocess.hu_int16(vol.hu), None, vol.grid, meta)
