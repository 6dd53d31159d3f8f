"""Finding the series in a folder tree (headers only): ``find_series(root)``.

Files are grouped by SeriesInstanceUID (several series in one folder are normal); files without one (research
exports such as the COCA non-gated release) by folder and what identifies a series physically
(``calcjax.io.dicom_headers.physical_series_key``), marked ``grouping="geometry"``. Unreadable files come back
as ``DicomError`` entries; pydicom's warnings are counted per series, never printed. No jax here.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections import defaultdict

from calcjax.io.dicom_errors import DicomError, NotDicomError
from calcjax.io.dicom_headers import (
    ReaderWarnings,
    identifying_values,
    physical_series_key,
    position_along_normal,
    read_dataset,
)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


OUTPUT_FOLDER_MARKER = ".calcjax.lock"

"""The lock file every calcjax output folder holds (``calcjax.io.outputs.FolderLock``): a folder with one is a
job's output (shards, scores), never searched as input."""


@dataclasses.dataclass(frozen=True)
class SeriesFiles:
    """Files of one series found by :func:`find_series` (``uid`` stays in memory; never log it).

    Attributes:
      uid: the SeriesInstanceUID, or for a series grouped without one (``grouping == "geometry"``) a key
        built from its folder (relative to the searched root) and :func:`physical_series_key`; either way
        the input of the salted scan id, never written anywhere.
      folder, files, modality: where the series lies, its files (sorted), its Modality.
      identifiers: identifying header values to redact from messages about it.
      grouping: ``uid`` (by SeriesInstanceUID) or ``geometry`` (no UID in the files).
      reader_warnings: ``((message, count), ...)``: pydicom's warnings while reading its headers, the
        offending values cut out.
    """

    uid: str
    folder: str
    files: tuple[str, ...]
    modality: str
    identifiers: frozenset[str] = frozenset()
    grouping: str = "uid"
    reader_warnings: tuple[tuple[str, int], ...] = ()


def _split_colliding_acquisitions(members: list[tuple[str, str, float | None]]) -> list[list[str]]:
    """The files of one UID-less group, split by AcquisitionNumber only where that resolves slices at the
    same position (two acquisitions of the same range); otherwise one series. ``members``: (path,
    acquisition number, position along the normal)."""
    positions = [round(p, 2) for _, _, p in members if p is not None]
    if len(set(positions)) == len(positions):
        return [[m[0] for m in members]]
    by_acq: dict[str, list] = defaultdict(list)
    for m in members:
        by_acq[m[1]].append(m)
    if len(by_acq) > 1 and all(
        len({round(p, 2) for _, _, p in g if p is not None}) == sum(p is not None for _, _, p in g)
        for g in by_acq.values()
    ):
        return [[m[0] for m in g] for _, g in sorted(by_acq.items())]
    return [[m[0] for m in members]]  # read_series names the colliding slices


def find_series(root: str, exclude=()) -> tuple[list[SeriesFiles], list[DicomError]]:
    """Groups every DICOM file under ``root`` into series (headers only).

    By SeriesInstanceUID; files without one, by folder and :func:`physical_series_key` (marked
    ``grouping="geometry"``). Folder links are followed, each real folder searched once. Returns the
    series (sorted by folder, then file list) and the files that could not be read as DICOM. DICOMDIR
    index files are skipped silently. pydicom's warnings are counted per series
    (``SeriesFiles.reader_warnings``), never printed. Folders in ``exclude`` (the job's own output folder
    when it lies inside its input) and calcjax output folders (holding :data:`OUTPUT_FOLDER_MARKER`) are
    not searched.
    """
    groups = _Groups(root)
    for path in _candidate_files(root, exclude):
        groups.add(path)
    series = groups.uid_series() + groups.geometry_series()
    series.sort(key=lambda s: (s.folder, s.files))
    return series, groups.bad


def _candidate_files(root: str, exclude=()):
    """Every file under ``root`` that may be DICOM, folder by folder in sorted order. Folder links are
    followed (a cohort is often assembled from links to patient folders); a folder reached twice, through
    a link loop or two links to one place, is searched once."""
    excluded = {os.path.realpath(e) for e in exclude}
    seen_dirs: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs or real in excluded or OUTPUT_FOLDER_MARKER in files:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.upper() != "DICOMDIR" and not name.startswith(".") and _looks_like_dicom(path):
                yield path


def _is_dicomdir(ds) -> bool:
    return str(ds.get("SOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


class _Groups:
    """The series being gathered from headers: by SeriesInstanceUID, and UID-less files by folder and
    physical key; the files that are not DICOM in ``bad``."""

    def __init__(self, root: str):
        self.root = root
        self.files: dict[str, list[str]] = defaultdict(list)
        self.modality: dict[str, str] = {}
        self.identifiers: dict[str, set[str]] = defaultdict(set)
        self.counters: dict[str, ReaderWarnings] = defaultdict(ReaderWarnings)
        self.no_uid: dict[tuple, list[tuple[str, str, float | None]]] = defaultdict(list)
        self.no_uid_info: dict[tuple, tuple[str, set[str], ReaderWarnings, dict[str, str]]] = {}
        self.bad: list[DicomError] = []

    def add(self, path: str) -> None:
        """Reads one file's header into its group (or ``bad``); DICOMDIR index files are skipped."""
        counter = ReaderWarnings()
        with counter.capture():
            try:
                ds = read_dataset(path, headers_only=True)
            except DicomError as e:
                self.bad.append(e)
                return
            if _is_dicomdir(ds):
                return
            uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            mod = str(ds.get("Modality", ""))
            ids = identifying_values(ds)
            key = None if uid else self._add_without_uid(path, ds, mod, ids)
        if uid:
            self.files[uid].append(path)
            self.modality[uid] = mod
            self.identifiers[uid] |= ids
            self.counters[uid].counts.update(counter.counts)
        elif key is not None:
            self.no_uid_info[key][2].counts.update(counter.counts)

    def _add_without_uid(self, path: str, ds, mod: str, ids: set[str]) -> tuple | None:
        """Files a UID-less header under its folder and physical key (the key), or records a file that
        is no image (None)."""
        if "SOPClassUID" not in ds and not mod:
            self.bad.append(
                NotDicomError(path, "no SeriesInstanceUID, SOPClassUID or Modality: not an image")
            )
            return None
        key = (os.path.relpath(os.path.dirname(path), self.root), mod) + physical_series_key(ds)
        acq = str(ds.get("AcquisitionNumber", "") or "")
        self.no_uid[key].append((path, acq, position_along_normal(ds)))
        info = self.no_uid_info.setdefault(key, (mod, set(), ReaderWarnings(), {}))
        info[1].update(ids)
        info[3][path] = str(ds.get("SOPInstanceUID", "") or "").strip()
        return key

    def uid_series(self) -> list[SeriesFiles]:
        return [
            SeriesFiles(uid, _common_folder(files), tuple(files), self.modality[uid],
                        frozenset(self.identifiers[uid]), "uid", self.counters[uid].items())
            for uid, files in self.files.items()
        ]  # fmt: skip

    def geometry_series(self) -> list[SeriesFiles]:
        """The UID-less groups, split where acquisitions collide (``_split_colliding_acquisitions``)."""
        series = []
        for key, members in self.no_uid.items():
            mod, ids, counter, sop_uids = self.no_uid_info[key]
            parts = _split_colliding_acquisitions(members)
            for i, files in enumerate(parts):
                share = counter.counts if i == 0 else collections.Counter()
                files = sorted(files)
                sops = sorted(sop_uids[f] for f in files)
                # The grouping key (the scan id's input): the instances' own UIDs when every file has one, so
                # a scan keeps its id whichever folder above it is searched; else the folder-relative key.
                if all(sops):
                    group_key = "nouid-instances:" + "|".join(sops)
                else:
                    group_key = "nouid:" + repr(key) + (f"|acquisition-part-{i}" if len(parts) > 1 else "")
                warnings = tuple(sorted(share.items(), key=lambda kv: (-kv[1], kv[0])))
                series.append(SeriesFiles(group_key, _common_folder(files), tuple(files), mod, frozenset(ids),
                                          "geometry", warnings))  # fmt: skip
        return series


def _common_folder(files) -> str:
    return os.path.commonpath([os.path.dirname(f) for f in files])


_NON_DICOM_SUFFIXES = (".json", ".xml", ".nii", ".nii.gz", ".png", ".txt", ".csv", ".md", ".jsonl", ".xlsx")


def _looks_like_dicom(path: str) -> bool:
    """Skips the label and report files that live beside series; everything else is tried."""
    return not path.lower().endswith(_NON_DICOM_SUFFIXES)
