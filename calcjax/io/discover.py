"""Finds the scans of an input tree, their labels, pseudonymous ids and splits (headers only).

- Series: every DICOM series under the input (``calcjax.io.dicom_series.find_series``); non-CT series and
  unreadable files become error entries.
- Scan id: ``scan-`` + the first 16 hex digits of SHA-256(salt + SeriesInstanceUID): stable for a salt,
  not reversible without it. The UID itself never leaves memory. A series without a UID is hashed from
  its instances' SOPInstanceUIDs (or, where a file lacks one, its folder relative to the input and
  ``calcjax.io.dicom_headers.physical_series_key``) and marked ``grouping="geometry"`` in its job, the
  manifest and the score row.
- Names in outputs: a series by its scan id, a file of no series by ``file-<salted hash>``, a file of a
  series by its position (``calcjax.io.deid``); never a path. ``discover(private_map=...)`` collects each
  name's path relative to the input for the private map the caller keeps beside the salt.
- Reader warnings: pydicom's per-file warnings are counted per series and reported once, as a
  ``reader_warnings`` line (``"severity": "warning"``; the scan is still built) in the errors list and
  one log line.
- Split: by scan, from SHA-256(split seed + scan id) mapped to [0, 1) and cut at the cumulative ratios,
  so a scan keeps its split when other scans are added. ``split_by="patient"`` hashes the patient's
  salted id instead (:func:`patient_of`), so every series of one patient falls in one split.
- Labels, first found wins: a mirrored ``--labels`` tree (``<labels>/<series folder>.nii.gz``,
  ``<labels>/<series folder>/label.nii.gz``, ``<labels>/<parent folder>/label.nii.gz``); then
  ``label.nii.gz`` or ``calcium.xml`` in the series folder or its parent (the phantom's layout); then the
  COCA release layout ``.../patient/<id>/<series>/`` with ``.../calcium_xml/<id>.xml``. ``label_format``
  picks NIfTI or XML where both exist.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

from calcjax.io import deid, dicom_headers, dicom_series
from calcjax.io.deid import redact
from calcjax.io.errors import reason_of


class NoScansError(ValueError):
    """A search that found no CT series at all: an error for a batch job, never an empty success."""

    kind = "no_scans"


def no_scans_error(root: str, errors: list[dict]) -> NoScansError:
    """The error of a search that found nothing (printed to the user who gave ``root``; not written)."""
    bad = sum(e.get("severity") != "warning" for e in errors)
    return NoScansError(
        f"no CT series found under {root} (folder links followed; {bad} input(s) could not be read as CT: "
        "see errors.jsonl)"
    )


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScanJob:
    """One scan to build (no identifying value in any field but ``files`` / ``label_path`` / ``root``).

    Attributes:
      scan_id: pseudonymous id (also the scan's name in every output: no path text leaves memory).
      split: split name.
      files: the series' DICOM files.
      label_path: label file or None (unlabelled).
      label_format: ``nifti``, ``xml`` or None.
      num_files: file count (an estimate of the slice count before localizers are dropped).
      identifiers: identifying header values to redact from any message about this scan.
      shared_folder: how many series share the series folder (a label there must match this one).
      grouping: ``uid`` (by SeriesInstanceUID) or ``geometry`` (the files carry no SeriesInstanceUID).
    """

    scan_id: str
    split: str
    files: tuple[str, ...]
    label_path: str | None
    label_format: str | None
    num_files: int
    identifiers: frozenset[str]
    shared_folder: int = 1
    grouping: str = "uid"
    root: str = "."

    def safe_reason(self, e: Exception) -> str:
        """The reason of an error about this scan with no header value and no path text in it: the file
        that failed is named by its position in the series (``calcjax.io.deid``)."""
        reason = reason_of(e)
        path = getattr(e, "path", None)
        if path in self.files:
            reason = f"{deid.file_in_series(self.scan_id, self.files.index(path), len(self.files))}: {reason}"
        elif path is not None and path == self.label_path:
            reason = f"label file: {reason}"
        paths = list(self.files) + ([self.label_path] if self.label_path else [])
        return deid.scrub_paths(redact(reason, self.identifiers), self.root, paths)


def scan_id_of(series_uid: str, salt: str) -> str:
    return "scan-" + hashlib.sha256((salt + "\0" + series_uid).encode()).hexdigest()[:16]


def split_of(scan_id: str, seed: int, ratios: list[tuple[str, float]]) -> str:
    """The split of a scan: a hash of (seed, scan id) in [0, 1) cut at the cumulative ratios."""
    h = int(hashlib.sha256(f"{seed}:{scan_id}".encode()).hexdigest()[:15], 16) / 16**15
    total = sum(r for _, r in ratios)
    acc = 0.0
    for name, r in ratios:
        acc += r / total
        if h < acc:
            return name
    return ratios[-1][0]


def patient_of(series: dicom_series.SeriesFiles, root: str) -> str:
    """The patient of a series, for patient-level splits (held in memory only): the folder ``<id>`` of the
    COCA release's ``patient/<id>/<series>/`` layout, else the PatientID of its first file, else the series
    itself (a series without a PatientID is a patient of its own)."""
    parts = os.path.normpath(os.path.relpath(series.folder, root)).split(os.sep)
    if len(parts) >= 3 and parts[-3] == "patient":
        return "coca-patient:" + os.sep.join(parts[:-1])
    patient_id = dicom_headers.patient_id(series.files[0])
    return "patient-id:" + patient_id if patient_id else "series:" + series.uid


def parse_split(spec: str) -> list[tuple[str, float]]:
    """``"train=0.8,val=0.1,test=0.1"`` -> [("train", 0.8), ...]; ratios must be positive."""
    out = []
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if not name.strip() or not value:
            raise ValueError(f"bad --split part {part!r}; expected name=ratio")
        ratio = float(value)
        if ratio <= 0:
            raise ValueError(f"split ratio of {name!r} must be positive, got {ratio}")
        out.append((name.strip(), ratio))
    return out


def find_label(
    series_folder: str, root: str, labels_dir: str | None, label_format: str
) -> tuple[str, str] | tuple[None, None]:
    """The label file of a series and its format, or (None, None) (see module docstring)."""
    rel = os.path.relpath(series_folder, root)
    candidates: list[tuple[str, str]] = []
    if labels_dir:
        candidates += [
            (os.path.join(labels_dir, rel + ".nii.gz"), "nifti"),
            (os.path.join(labels_dir, rel, "label.nii.gz"), "nifti"),
            (os.path.join(labels_dir, os.path.dirname(rel), "label.nii.gz"), "nifti"),
        ]
    for folder in (series_folder, os.path.dirname(series_folder)):
        candidates += [
            (os.path.join(folder, "label.nii.gz"), "nifti"),
            (os.path.join(folder, "calcium.xml"), "xml"),
        ]
    parts = os.path.normpath(series_folder).split(os.sep)
    if len(parts) >= 3 and parts[-3] == "patient":
        release = os.sep.join(parts[:-3]) or os.sep
        candidates.append((os.path.join(release, "calcium_xml", parts[-2] + ".xml"), "xml"))
    if label_format in ("nifti", "xml"):
        candidates.sort(key=lambda c: c[1] != label_format)
    for path, fmt in candidates:
        if os.path.isfile(path):
            return path, fmt
    return None, None


def discover(
    root: str,
    *,
    salt: str,
    split: list[tuple[str, float]],
    split_seed: int,
    labels_dir: str | None = None,
    label_format: str = "auto",
    exclude=(),
    private_map: dict[str, str] | None = None,
    split_by: str = "series",
) -> tuple[list[ScanJob], list[dict]]:
    """Scan jobs (sorted by split, then scan id) and error entries for inputs that cannot be scans.

    ``split_by``: ``series`` (each scan on its own) or ``patient`` (every series of a patient in one split).
    Inputs are named in the entries by scan id or salted file name, never by path (``calcjax.io.deid``);
    ``private_map``, when given, receives ``name -> path relative to root`` for each name used.
    ``exclude``: folders not searched (the job's own output folder when it lies inside ``root``).
    """
    series, bad = dicom_series.find_series(root, exclude=exclude)
    names = private_map if private_map is not None else {}
    errors = [_unreadable_entry(e, root, salt, names) for e in bad]
    per_folder: dict[str, int] = {}
    for s in series:
        per_folder[s.folder] = per_folder.get(s.folder, 0) + 1
    jobs, seen = [], {}
    for s in series:
        scan_id = scan_id_of(s.uid, salt)
        rel = os.path.relpath(s.folder, root)
        refused = _refusal(s, scan_id, seen)
        if refused is not None:
            names[refused["input"]] = rel
            errors.append(refused)
            continue
        seen[scan_id] = 1
        names[scan_id] = rel
        if s.reader_warnings:
            errors.append(_warnings_entry(s, scan_id, root))
        label_path, fmt = find_label(s.folder, root, labels_dir, label_format)
        jobs.append(
            ScanJob(
                scan_id=scan_id,
                split=split_of(_split_key(s, scan_id, root, salt, split_by), split_seed, split),
                files=s.files,
                label_path=label_path,
                label_format=fmt,
                num_files=len(s.files),
                identifiers=s.identifiers,
                shared_folder=per_folder[s.folder],
                grouping=s.grouping,
                root=root,
            )
        )
    jobs.sort(key=lambda j: (j.split, j.scan_id))
    return jobs, errors


def _split_key(s: dicom_series.SeriesFiles, scan_id: str, root: str, salt: str, split_by: str) -> str:
    """What a series' split is hashed from: its scan id, or its patient's salted id (``split_by``)."""
    if split_by == "series":
        return scan_id
    if split_by != "patient":
        raise ValueError(f"split_by must be 'series' or 'patient', got {split_by!r}")
    return scan_id_of(patient_of(s, root), salt)


def _unreadable_entry(e, root: str, salt: str, names: dict[str, str]) -> dict:
    """The error entry of a file that is no usable DICOM, named by its salted file name."""
    rel = os.path.relpath(e.path, root)
    name = deid.file_name(salt, rel)
    names[name] = rel
    reason = deid.scrub_paths(e.reason, root, [e.path])
    return {"input": name, "stage": "discover", "kind": e.kind, "reason": reason}


def _refusal(s, scan_id: str, seen: dict[str, int]) -> dict | None:
    """The error entry of a series that is not scanned (not CT, or a copy of one already found), else
    None."""
    if s.modality != "CT":
        return {
            "input": scan_id,
            "stage": "discover",
            "kind": "not_ct",
            "reason": f"Modality {s.modality}, not CT",
        }
    if scan_id not in seen:
        return None
    seen[scan_id] += 1
    return {
        "input": f"{scan_id} copy {seen[scan_id]}",
        "stage": "discover",
        "kind": "duplicate_series",
        "reason": f"the same series lies in {seen[scan_id]} folders; built once",
        "scan_id": scan_id,
    }


def _warnings_entry(s, scan_id: str, root: str) -> dict:
    """The warning entry of a series read with reader warnings (redacted, no path text); logged too."""
    summary = deid.scrub_paths(
        redact(dicom_headers.warnings_summary(s.reader_warnings), s.identifiers), root, s.files
    )
    log.warning("%s (%d files): %s", scan_id, len(s.files), summary)
    return {
        "input": scan_id,
        "stage": "discover",
        "kind": "reader_warnings",
        "severity": "warning",
        "reason": f"{summary} (over {len(s.files)} files; the scan is still read)",
        "scan_id": scan_id,
    }
