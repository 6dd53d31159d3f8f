"""The shard record: one 2.5D stack of a CT slice, as bytes (schema versioned; numpy only).

A record is ``MAGIC`` (4 bytes) | header length (uint32 little-endian) | header (UTF-8 JSON) | payload.
The header holds the scalar fields and, per array, its dtype, shape and offset in the payload, plus the
payload's CRC-32, so a corrupt record is refused with a reason instead of decoding to garbage. No TensorFlow
and no jax are needed to decode, and arrays come back without copying (read-only views of the bytes).

Fields (DESIGN.md "Record"):
- ``scan_id`` (str): pseudonymous scan id (salted hash; never a DICOM UID or name);
- ``slice_index``, ``num_slices`` (int): the centre slice's index in the scan (z ascending) and the count;
- ``image`` int16 ``(C, H, W)`` HU of the C = 2k+1 adjacent slices centred on ``slice_index`` (edges
  replicate the first / last slice);
- ``label`` uint8 ``(H, W)`` of the centre slice, or absent (``None``) for unlabelled scans;
- ``spacing`` ``[dz, dy, dx]`` mm (dz = slice increment), ``slice_thickness`` mm (or None),
  ``protocol`` (chest / cardiac / unknown), ``kvp`` (or None), ``has_calcium`` (label has a voxel > 0).
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np

SCHEMA_VERSION = 1
MAGIC = b"CJXR"
_HEADER_LEN = struct.Struct("<I")
SCALAR_FIELDS = (
    "scan_id",
    "slice_index",
    "num_slices",
    "spacing",
    "slice_thickness",
    "protocol",
    "kvp",
    "has_calcium",
)
ARRAY_FIELDS = {"image": np.dtype("<i2"), "label": np.dtype("u1")}


class RecordError(ValueError):
    """A record that cannot be decoded, with the reason."""


def encode(record: dict) -> bytes:
    """Encodes a record dict (the fields in the module docstring) to bytes."""
    header = {"schema_version": SCHEMA_VERSION}
    for name in SCALAR_FIELDS:
        header[name] = record.get(name)
    header["spacing"] = [float(s) for s in record["spacing"]]
    arrays, chunks, offset = {}, [], 0
    for name, dtype in ARRAY_FIELDS.items():
        value = record.get(name)
        if value is None:
            continue
        a = np.ascontiguousarray(value, dtype=dtype)
        arrays[name] = {"dtype": dtype.str, "shape": list(a.shape), "offset": offset}
        chunks.append(a.tobytes())
        offset += a.nbytes
    image = record["image"]
    if np.ndim(image) != 3:
        raise RecordError(f"image must be (C, H, W), got shape {np.shape(image)}")
    if record.get("label") is not None and np.shape(record["label"]) != np.shape(image)[1:]:
        raise RecordError(f"label {np.shape(record['label'])} does not match image {np.shape(image)}")
    payload = b"".join(chunks)
    header["arrays"] = arrays
    header["payload_bytes"] = len(payload)
    header["crc32"] = zlib.crc32(payload)
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + _HEADER_LEN.pack(len(head)) + head + payload


def decode(data: bytes) -> dict:
    """Decodes bytes from :func:`encode`; raises :class:`RecordError` naming what is wrong."""
    data = memoryview(data)
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise RecordError("not a calcjax record (bad magic)")
    (n,) = _HEADER_LEN.unpack(data[4:8])
    if 8 + n > len(data):
        raise RecordError(f"truncated record: header of {n} bytes, {len(data) - 8} available")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError as e:
        raise RecordError(f"corrupt record header ({e})") from None
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"record schema version {version}; this calcjax reads version {SCHEMA_VERSION}")
    payload = data[8 + n :]
    if len(payload) != header["payload_bytes"]:
        raise RecordError(
            f"truncated record: payload of {len(payload)} bytes, expected {header['payload_bytes']}"
        )
    if zlib.crc32(payload) != header["crc32"]:
        raise RecordError("corrupt record: payload checksum mismatch")
    out = {name: header.get(name) for name in SCALAR_FIELDS}
    out["schema_version"] = version
    for name in ARRAY_FIELDS:
        spec = header["arrays"].get(name)
        if spec is None:
            out[name] = None
            continue
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"]))
        out[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=spec["offset"]).reshape(
            spec["shape"]
        )
    return out


def stack_indices(k: int, num_slices: int, context: int) -> np.ndarray:
    """Slice indices of the 2.5D stack centred on ``k``: ``k - context .. k + context``, edges replicated."""
    return np.clip(np.arange(k - context, k + context + 1), 0, num_slices - 1)
