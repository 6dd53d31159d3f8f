"""The shard folder of ``data_prep.build``: its manifest as types, and the one way to read a scan back.

A shard folder holds ``{split}-{i:05d}-of-{n:05d}.array_record`` files of records (``calcjax.io.records``:
one record per slice, ``C = 2 * context + 1`` adjacent int16 HU slices and the centre slice's uint8 label),
and ``manifest.json``: the build's settings, per split its shard files, record count and the split-wide
indices of records with calcium, and per scan where its records lie (one shard, contiguous, in z order)
with its non-identifying metadata. ``data_prep.builder`` writes it (:func:`write_manifest`); training,
validation, scoring and the PyTorch trainer read it through :class:`Manifest` and :func:`read_scan`.

The folder is also a TFDS dataset (array_record format): :func:`write_tfds_metadata` adds TFDS's
``dataset_info.json`` (name ``calcjax_shards``, splits with their shard lengths, the file template
``{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}``) and ``features.json`` (:data:`calcjax.io.records.FEATURES`), so
``tfds.builder_from_directory(folder).as_data_source("train")`` reads the same files, decoded the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from calcjax.io import records
from calcjax.io.atomic import write_atomic

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: records are TFDS examples (records.SCHEMA_VERSION 2) and the folder a TFDS dataset
TFDS_NAME = "calcjax_shards"
TFDS_FILE_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"  # = data_prep.builder.shard_name
TFDS_METADATA_TMP = ".tfds-metadata-"  # write_tfds_metadata's temporary folder (a killed build's is removed)


class NotAShardFolderError(FileNotFoundError):
    """A folder without a readable ``manifest.json`` (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class ScanEntry:
    """One scan of a shard folder.

    Attributes:
      scan_id: the salted scan id. split, shard: its split and shard file (a name in the folder).
      record_start, num_records: its records in the shard (contiguous, z order); split_record_start: the
        same start counted over the whole split (the training stream's index).
      protocol: chest / cardiac / unknown. spacing: ``(dz, dy, dx)`` mm. labelled: has reference labels.
      meta: the manifest's whole entry (kvp, thickness, geometry, calcium slices, grouping, ...).
    """

    scan_id: str
    split: str
    shard: str
    record_start: int
    num_records: int
    split_record_start: int
    protocol: str
    spacing: tuple[float, float, float]
    labelled: bool
    meta: dict

    @classmethod
    def from_dict(cls, d: dict) -> ScanEntry:
        return cls(
            scan_id=d["scan_id"],
            split=d["split"],
            shard=d["shard"],
            record_start=int(d["record_start"]),
            num_records=int(d["num_records"]),
            split_record_start=int(d.get("split_record_start", d["record_start"])),
            protocol=d.get("protocol", "unknown"),
            spacing=tuple(float(v) for v in d["spacing"]),
            labelled=bool(d.get("labelled", True)),
            meta=d,
        )


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a shard folder: its shard ``paths``, ``num_records``, the split-wide indices of the
    records with calcium, and its scans in manifest order."""

    folder: str
    name: str
    paths: tuple[str, ...]
    num_records: int
    calcium_records: np.ndarray
    scans: tuple[ScanEntry, ...]
    context: int

    @classmethod
    def load(cls, folder: str, split: str) -> Split:
        """``Manifest.read(folder).split(split)``."""
        return Manifest.read(folder).split(split)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A shard folder's ``manifest.json``: ``context`` (records hold ``2 * context + 1`` slices), the
    split names, the scans in order, and ``data`` (the whole JSON object)."""

    folder: str
    context: int
    split_names: tuple[str, ...]
    scans: tuple[ScanEntry, ...]
    data: dict

    @classmethod
    def read(cls, folder: str) -> Manifest:
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise NotAShardFolderError(f"{folder} has no {MANIFEST}: is it a data_prep.build shard folder?")
        try:
            with open(path) as f:
                data = json.load(f)
            version = data.get("manifest_version")
            if version != MANIFEST_VERSION:
                raise NotAShardFolderError(
                    f"{path} has manifest version {version} (records of another format); this calcjax reads "
                    f"version {MANIFEST_VERSION}: rebuild the folder with python -m data_prep.build"
                )
            scans = tuple(ScanEntry.from_dict(s) for s in data["scans"])
            context = int(data["settings"].get("context", 1))
            names = tuple(data["splits"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise NotAShardFolderError(
                f"{path} is not a readable shard manifest ({e.__class__.__name__}: {e}); rebuild the folder"
            ) from None
        return cls(folder=folder, context=context, split_names=names, scans=scans, data=data)

    def split(self, name: str) -> Split:
        """The split ``name``; a ValueError naming the splits there when it has none."""
        if name not in self.data["splits"]:
            raise ValueError(f"{self.folder} has no split {name!r}; it has {sorted(self.split_names)}")
        entry = self.data["splits"][name]
        return Split(
            folder=self.folder,
            name=name,
            paths=tuple(os.path.join(self.folder, s["file"]) for s in entry["shards"]),
            num_records=int(entry["num_records"]),
            calcium_records=np.asarray(entry["calcium_records"], dtype=np.int64),
            scans=tuple(s for s in self.scans if s.split == name),
            context=self.context,
        )


def write_manifest(out: str, manifest: dict) -> None:
    """Writes ``out/manifest.json`` atomically, after checking that :meth:`Manifest.read` can read it."""
    for scan in manifest["scans"]:
        ScanEntry.from_dict(scan)  # raises on an entry Manifest.read could not read back
    write_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1))


def write_tfds_metadata(out: str, split_shards: dict[str, list[tuple[str, int]]], description: str) -> None:
    """Makes the shard folder ``out`` a TFDS dataset: writes ``dataset_info.json`` and ``features.json``.

    Args:
      split_shards: per split, its shard files' names (in index order, named by ``TFDS_FILE_TEMPLATE``)
        and record counts.
      description: the dataset description TFDS shows.

    The files are written to a temporary folder in ``out`` and renamed into place one by one.
    """
    from tensorflow_datasets.core import dataset_info, file_adapters, naming, utils
    from tensorflow_datasets.core import splits as splits_lib

    infos = []
    for name, shards in split_shards.items():
        template = naming.ShardedFileTemplate(
            data_dir=out,
            template=TFDS_FILE_TEMPLATE,
            dataset_name=TFDS_NAME,
            split=name,
            filetype_suffix=file_adapters.FileFormat.ARRAY_RECORD.file_suffix,
        )
        for i, (file, _) in enumerate(shards):
            expected = os.path.basename(template.sharded_filepath(shard_index=i, num_shards=len(shards)))
            if file != expected:
                raise ValueError(f"shard {file} does not follow the TFDS file template (expected {expected})")
        num_bytes = sum(os.path.getsize(os.path.join(out, f)) for f, _ in shards)
        infos.append(
            splits_lib.SplitInfo(
                name=name,
                shard_lengths=[n for _, n in shards],
                num_bytes=num_bytes,
                filename_template=template,
            )
        )
    identity = dataset_info.DatasetIdentity(
        name=TFDS_NAME, version=utils.Version(f"{records.SCHEMA_VERSION}.0.0"), data_dir=out, module_name=""
    )
    info = dataset_info.DatasetInfo(builder=identity, features=records.FEATURES, description=description)
    info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    info.set_splits(splits_lib.SplitDict(infos))
    tmp = tempfile.mkdtemp(prefix=TFDS_METADATA_TMP, dir=out)
    try:
        info.write_to_directory(tmp)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Readers:
    """One ArrayRecordReader per shard file, opened on first use and reused; ``close()`` (or ``with``). A
    pickled copy holds no open file (another process opens its own on first use)."""

    def __init__(self):
        self._readers: dict[str, ArrayRecordReader] = {}

    def get(self, path: str) -> ArrayRecordReader:
        """The reader of ``path``; a RecordError naming the file when it cannot be opened (a damaged
        header or footer: array_record raises plain RuntimeErrors)."""
        if path not in self._readers:
            try:
                self._readers[path] = ArrayRecordReader(path)
            except Exception as e:
                raise records.RecordError(
                    f"{os.path.basename(path)}: unreadable ArrayRecord file: {e}"
                ) from None
        return self._readers[path]

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> Readers:
        return self

    def __getstate__(self) -> dict:
        return {}  # open files stay in their process: a copy sent to a worker opens its own

    def __setstate__(self, state: dict) -> None:
        self._readers = {}

    def __exit__(self, *exc) -> None:
        self.close()


def read_scan(
    reader: ArrayRecordReader, scan: ScanEntry, context: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The scan's int16 HU centre slices ``(Z, H, W)`` and uint8 labels ``(Z, H, W)`` (None if unlabelled).

    Only the centre slices are kept: the 2.5D stacks are rebuilt from them by the rule the records were
    written with (``calcjax.io.preprocess.slice_stacks``), so a scan costs one HU volume in memory, not C;
    a test holds the rebuilt stacks equal to the stored ones. Raises :class:`calcjax.io.records.RecordError`
    naming the shard, the record and the scan when a record cannot be read or decoded, or has another
    channel count than ``2 * context + 1``.
    """
    start, count = scan.record_start, scan.num_records
    where = f"{scan.shard}, scan {scan.scan_id}"
    try:
        raw = reader.read(start, start + count)
    except Exception as e:  # array_record raises plain RuntimeErrors on damaged chunks
        raise records.RecordError(f"{where}: records {start}-{start + count - 1} unreadable: {e}") from None
    hu = labels = None
    for i, data in enumerate(raw):
        try:
            rec = records.decode(data)
        except records.RecordError as e:
            raise records.RecordError(f"{where}: record {start + i}: {e}") from None
        if rec["image"].shape[0] != 2 * context + 1:
            raise records.RecordError(f"{where}: record {start + i} has {rec['image'].shape[0]} channels")
        if hu is None:
            hu = np.empty((count,) + rec["image"].shape[1:], np.int16)
            labels = None if rec["label"] is None else np.empty((count,) + rec["image"].shape[1:], np.uint8)
        hu[i] = rec["image"][context]
        if labels is not None:
            labels[i] = rec["label"]
    if hu is None:
        raise records.RecordError(f"{where}: no records")
    return hu, labels
