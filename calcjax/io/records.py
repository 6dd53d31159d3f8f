"""The shard record: one 2.5D stack of a CT slice, as a TFDS ``tf.train.Example`` (numpy only, no TensorFlow).

A record is a ``tf.train.Example`` serialised by TFDS's own serializer for :data:`FEATURES` (schema
versioned), so a shard folder is also a TFDS dataset (``calcjax.io.shards`` writes its
``dataset_info.json`` and ``features.json``) and ``tfds.builder_from_directory(folder).as_data_source(split)``
reads the very files the grain pipeline reads. :func:`decode` is the one decode path: TFDS's
``deserialize_example_np`` (as the TFDS data source does), then the checks TFDS does not make (schema
version, array shapes), each failure a :class:`RecordError` with the reason.

Integrity: the records carry no checksum of their own (the schema-1 records had a CRC-32). ArrayRecord's
Riegeli chunks are hashed (HighwayHash of each chunk's header and data), so a damaged shard fails in the
reader, which ``calcjax.io.shards.read_scan`` turns into a RecordError naming the shard, record and scan;
``tests/test_shard_folder.py`` flips single bits across a shard and finds every flip either refused there
or outside the records' bytes. A record-level CRC never fired in that test and cost 45% of decode time.

Why TFDS here: ``bench/tfds_decode.py`` measured this format against calcjax's earlier
JSON-header records in one run, decode alone and decode + the training crop's augmentation; it stays
because the input pipeline loses less than the 10% the issue allows (figures in the README).

Fields:
- ``scan_id`` (str): pseudonymous scan id (salted hash; never a DICOM UID or name);
- ``slice_index``, ``num_slices`` (int): the centre slice's index in the scan (z ascending) and the count;
- ``image`` int16 ``(C, H, W)`` HU of the C = 2k+1 adjacent slices centred on ``slice_index`` (edges
  replicate the first / last slice);
- ``label`` uint8 ``(H, W)`` of the centre slice, or ``None`` for unlabelled scans (stored as zeros with
  ``labelled`` false: zstd makes them nearly free, and TFDS features have no optional field);
- ``spacing`` ``[dz, dy, dx]`` mm (dz = slice increment, float64), ``slice_thickness`` mm (or None),
  ``protocol`` (chest / cardiac / unknown), ``kvp`` (or None), ``has_calcium`` (label has a voxel > 0).
  None is stored as NaN.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

SCHEMA_VERSION = 2


def _float64():
    # A float64 scalar as raw bytes: tf.train.Example's float_list is float32.
    return tfds.features.Tensor(shape=(), dtype=np.float64, encoding="bytes")


FEATURES = tfds.features.FeaturesDict(
    {
        "schema_version": np.int32,
        "scan_id": tfds.features.Text(),
        "slice_index": np.int32,
        "num_slices": np.int32,
        "image": tfds.features.Tensor(shape=(None, None, None), dtype=np.int16, encoding="bytes"),
        "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="bytes"),
        "labelled": np.bool_,
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float64, encoding="bytes"),
        "slice_thickness": _float64(),
        "protocol": tfds.features.Text(),
        "kvp": _float64(),
        "has_calcium": np.bool_,
    },
    doc="One 2.5D stack of a CT slice (calcjax.io.records).",
)
_SERIALIZER = example_serializer.ExampleSerializer(FEATURES.get_serialized_info())


class RecordError(ValueError):
    """A record that cannot be decoded, with the reason."""


def _optional(value) -> float:
    return math.nan if value is None else float(value)


def encode(record: dict) -> bytes:
    """Encodes a record dict (the fields in the module docstring) to bytes."""
    image = np.ascontiguousarray(record["image"], dtype="<i2")
    if image.ndim != 3:
        raise RecordError(f"image must be (C, H, W), got shape {image.shape}")
    labelled = record.get("label") is not None
    label = np.zeros(image.shape[1:], np.uint8)
    if labelled:
        if np.shape(record["label"]) != image.shape[1:]:
            raise RecordError(f"label {np.shape(record['label'])} does not match image {image.shape}")
        label = np.ascontiguousarray(record["label"], dtype=np.uint8)
    example = {
        "schema_version": SCHEMA_VERSION,
        "scan_id": str(record["scan_id"]),
        "slice_index": int(record["slice_index"]),
        "num_slices": int(record["num_slices"]),
        "image": image,
        "label": label,
        "labelled": labelled,
        "spacing": np.asarray(record["spacing"], np.float64),
        "slice_thickness": _optional(record.get("slice_thickness")),
        "protocol": str(record.get("protocol") or "unknown"),
        "kvp": _optional(record.get("kvp")),
        "has_calcium": bool(record.get("has_calcium")),
    }
    # deterministic: the proto's feature map is otherwise written in a per-process hash order, and the
    # same scan must give the same bytes in every build (a killed build's rerun is compared byte for byte).
    return _SERIALIZER.get_tf_example(FEATURES.encode_example(example)).SerializeToString(deterministic=True)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _or_none(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def decode(data: bytes) -> dict:
    """Decodes bytes from :func:`encode` (the fields in the module docstring, plus ``schema_version``);
    raises :class:`RecordError` naming what is wrong."""
    if not data:
        raise RecordError("empty record")
    try:
        ex = FEATURES.deserialize_example_np(data if isinstance(data, bytes) else bytes(data))
    except Exception as e:  # protobuf / TFDS raise several types on damaged bytes
        raise RecordError(f"not a readable calcjax record ({e.__class__.__name__}: {e})") from None
    version = int(ex["schema_version"])
    if version != SCHEMA_VERSION:
        raise RecordError(f"record schema version {version}; this calcjax reads version {SCHEMA_VERSION}")
    image, label = ex["image"], ex["label"]
    if image.ndim != 3 or label.shape != image.shape[1:]:
        raise RecordError(f"corrupt record: image {image.shape} and label {label.shape} do not match")
    return {
        "schema_version": version,
        "scan_id": _text(ex["scan_id"]),
        "slice_index": int(ex["slice_index"]),
        "num_slices": int(ex["num_slices"]),
        "image": image,
        "label": label if bool(ex["labelled"]) else None,
        "spacing": [float(s) for s in ex["spacing"]],
        "slice_thickness": _or_none(ex["slice_thickness"]),
        "protocol": _text(ex["protocol"]),
        "kvp": _or_none(ex["kvp"]),
        "has_calcium": bool(ex["has_calcium"]),
    }


def stack_indices(k: int, num_slices: int, context: int) -> np.ndarray:
    """Slice indices of the 2.5D stack centred on ``k``: ``k - context .. k + context``, edges replicated."""
    return np.clip(np.arange(k - context, k + context + 1), 0, num_slices - 1)
