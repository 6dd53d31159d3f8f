"""The fuzzer's bases and mutations (``bench/fuzz_dicom.py``).

A series is a list of entries ``{"name": relative path, "ds": pydicom.Dataset}`` (or ``"raw": bytes``
for a damaged file, ``"link": True`` for a file reached through a symbolic link). A mutation has a name,
an expectation (``preserve``: the image's meaning is unchanged, so it must score exactly as its base;
``refuse``: the series must be refused with a reason naming one of its ``keywords``, or scored exactly
as its base where a documented default applies) and a function of (entries, rng).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import io
import os
import struct
from collections.abc import Callable

import pydicom
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

ENTRY = dict


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    expect: str
    keywords: tuple[str, ...]
    fn: Callable

    def apply(self, entries: list[ENTRY], rng) -> list[ENTRY]:
        return self.fn([dict(e) for e in entries], rng)


# --- bases -------------------------------------------------------------------------------------------


def _read_folder(files: list[str]) -> list[ENTRY]:
    return [{"name": os.path.basename(f), "ds": pydicom.dcmread(f)} for f in sorted(files)]


def phantom_bases() -> dict[str, dict]:
    """A 48x48 cardiac phantom and a 40-slice window of a 48x48 chest phantom: ``{"entries": [...],
    "label": (z, y, x) uint8, "grid": Grid}`` each (the labels give every row a reference Agatston computed
    from the image's HU and geometry, so a change to either shows)."""
    import tempfile

    import numpy as np

    from data_prep.phantom.generator import generate_scan, write_scan

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, protocol, index in (("cardiac", "cardiac", 0), ("chest", "chest", 1)):
            scan = generate_scan(77, index, protocol, size=48, target_category=3)
            folder = write_scan(scan, tmp, seed=77, index=index)
            entries = _read_folder(glob.glob(os.path.join(folder, "dicom", "*.dcm")))
            label, grid = scan.label, scan.grid
            if protocol == "chest":  # the 40 slices around the middle, and their labels
                mid = len(entries) // 2
                entries = entries[mid - 20 : mid + 20]
                normal = np.cross(grid.row_dir, grid.col_dir)
                ks = [round(float((np.asarray(e["ds"].ImagePositionPatient, float) - grid.origin) @ normal)
                            / grid.spacing[0]) for e in entries]  # fmt: skip
                k0, k1 = min(ks), max(ks) + 1
                label = label[k0:k1]
                origin = tuple(float(v) for v in np.asarray(grid.origin) + k0 * grid.spacing[0] * normal)
                grid = dataclasses.replace(grid, shape=label.shape, origin=origin)
            out[name] = {"entries": entries, "label": label, "grid": grid}
    return out


def real_base(real: str) -> dict | None:
    """The first gated series of the real sample (``real/coca-sample``; no labels), or None when absent."""
    pattern = os.path.join(real, "coca-sample", "Gated_release_final", "patient", "0", "*", "*.dcm")
    files = sorted(glob.glob(pattern))
    return {"entries": _read_folder(files), "label": None, "grid": None} if files else None


def fresh_uids(entries: list[ENTRY], case: str) -> list[ENTRY]:
    """Deep copies with the case's own Study / Series / Frame-of-reference UIDs and instance UIDs (so no
    two cases form one series), derived from the case name (the same case gets the same UIDs)."""
    study, series, frame = (generate_uid(entropy_srcs=[case, k]) for k in ("study", "series", "frame"))
    out = []
    for i, e in enumerate(entries):
        ds = copy.deepcopy(e["ds"])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[case, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append({"name": e["name"], "ds": ds})
    return out


def write_series(folder: str, entries: list[ENTRY], outside: str, base: dict) -> None:
    """Writes the entries under ``folder`` (linked ones stored under ``outside`` and linked to), and the
    base's labels as ``folder/label.nii.gz`` where it has them."""
    if base["label"] is not None:
        from calcjax.io.labels import write_label_nifti

        os.makedirs(folder, exist_ok=True)
        write_label_nifti(os.path.join(folder, "label.nii.gz"), base["label"], base["grid"])
    for e in entries:
        path = os.path.join(folder, e["name"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = e["raw"] if "raw" in e else _bytes(e["ds"])
        if e.get("link"):
            target = os.path.join(outside, os.path.basename(folder), e["name"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
            os.symlink(target, path)
        else:
            with open(path, "wb") as f:
                f.write(data)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def same_score(a: dict, b: dict) -> bool:
    """Two score rows of the same image: equal Agatston, risk category, slices, volume, and the reference
    Agatston and volume computed from the labels on the image's HU and geometry."""
    keys = (
        "agatston",
        "risk_category",
        "num_slices",
        "volume_mm3",
        "reference_agatston",
        "reference_volume_mm3",
    )
    return all(a.get(k) == b.get(k) for k in keys)


# --- mutation helpers --------------------------------------------------------------------------------


def _each(change: Callable) -> Callable:
    """A mutation applying ``change(ds)`` to every file."""

    def fn(entries, rng):
        for e in entries:
            change(e["ds"])
        return entries

    return fn


def _one(change: Callable) -> Callable:
    """A mutation applying ``change(ds)`` to one file (a middle one)."""

    def fn(entries, rng):
        change(entries[len(entries) // 2]["ds"])
        return entries

    return fn


def _delete(keyword: str) -> Callable:
    def change(ds):
        if keyword in ds:
            delattr(ds, keyword)

    return change


def _set(keyword: str, value) -> Callable:
    return lambda ds: setattr(ds, keyword, value)


def bytes_with_raw_text(ds: pydicom.Dataset, keyword: str, text: str) -> bytes:
    """The file's bytes with ``text`` as the attribute's value byte for byte (pydicom will not set text
    like "abc" in a DS): a valid value of the same length is written, then overwritten in the bytes of the
    explicit-VR little-endian element. ``ds`` keeps the placeholder."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    vr = pydicom.datadict.dictionary_VR(tag)
    placeholder = "\\".join("7" * len(p) for p in text.split("\\"))
    if keyword in ds:
        ds[keyword].value = placeholder
    else:
        ds.add_new(tag, vr, placeholder)
    data = bytearray(_bytes(ds))
    value = text.encode() + (b" " if len(text) % 2 else b"")
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode() + struct.pack("<H", len(value))
    at = data.find(header)
    if at < 0:
        raise ValueError(f"{keyword} is not an explicit-VR element of this file")
    data[at + len(header) : at + len(header) + len(value)] = value
    return bytes(data)


def _raw_text(keyword: str, text: str) -> Callable:
    """Every file with ``text`` as the attribute's value byte for byte (:func:`bytes_with_raw_text`)."""

    def fn(entries, rng):
        for e in entries:
            e["raw"] = bytes_with_raw_text(e.pop("ds"), keyword, text)
        return entries

    return fn


def _truncate(fraction: float, every: bool = False) -> Callable:
    def fn(entries, rng):
        targets = entries if every else [entries[len(entries) // 2]]
        for e in targets:
            data = _bytes(e.pop("ds"))
            e["raw"] = data[: int(len(data) * fraction)]
        return entries

    return fn


def _compress(syntax, corrupt: bool = False) -> Callable:
    def fn(entries, rng):
        for i, e in enumerate(entries):
            e["ds"].compress(syntax)
            if corrupt and i == len(entries) // 2:
                frag = bytearray(e["ds"].PixelData)
                mid = len(frag) // 2
                frag[mid : mid + 24] = bytes(rng.randrange(256) for _ in range(24))
                e["ds"].PixelData = bytes(frag[: len(frag) - len(frag) // 4])
        return entries

    return fn


def _remove_middle(entries, rng):
    return entries[: len(entries) // 2] + entries[len(entries) // 2 + 1 :]


def _duplicate(other_pixels: bool) -> Callable:
    def fn(entries, rng):
        twin = copy.deepcopy(entries[len(entries) // 2])
        twin["name"] = "zz-duplicate.dcm"
        twin["ds"].SOPInstanceUID = generate_uid()
        if other_pixels:
            arr = twin["ds"].pixel_array.copy()
            arr[arr.shape[0] // 2] += 50
            twin["ds"].PixelData = arr.tobytes()
        return entries + [twin]

    return fn


def _rename(entries, rng):
    for i, e in enumerate(entries):
        e["name"] = f"{rng.getrandbits(40):010x}-{i}"
    return entries


def _reverse_names(entries, rng):
    names = [e["name"] for e in entries][::-1]
    for e, n in zip(entries, names, strict=True):
        e["name"] = n
    return entries


def _nest(entries, rng):
    for i, e in enumerate(entries):
        e["name"] = os.path.join("a", "b" if i % 2 else "c", e["name"])
    return entries


def _link(entries, rng):
    for e in entries:
        e["link"] = True
    return entries


ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _as_enhanced(drop: str = "") -> Callable:
    """The series as one Enhanced CT file: one frame per slice, each frame's plane position and pixel
    value transformation in its per-frame group, orientation and pixel measures shared; ``drop``: a
    per-frame group left out of one frame."""

    def fn(entries, rng):
        import numpy as np
        from pydicom.sequence import Sequence

        first = entries[0]["ds"]
        ds = copy.deepcopy(first)
        for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                  "RescaleSlope", "RescaleIntercept", "InstanceNumber", "SliceLocation"):  # fmt: skip
            if k in ds:
                delattr(ds, k)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
        ds.NumberOfFrames = len(entries)
        shared = pydicom.Dataset()
        shared.PlaneOrientationSequence = Sequence(
            [_item(ImageOrientationPatient=first.ImageOrientationPatient)]
        )
        measures = _item(PixelSpacing=first.PixelSpacing, SliceThickness=first.get("SliceThickness", 3))
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for i, e in enumerate(entries):
            fg = pydicom.Dataset()
            if not (drop == "PlanePositionSequence" and i == len(entries) // 2):
                fg.PlanePositionSequence = Sequence(
                    [_item(ImagePositionPatient=e["ds"].ImagePositionPatient)]
                )
            fg.PixelValueTransformationSequence = Sequence(
                [
                    _item(
                        RescaleSlope=e["ds"].RescaleSlope,
                        RescaleIntercept=e["ds"].RescaleIntercept,
                        RescaleType="HU",
                    )
                ]
            )
            frames.append(fg)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
        ds.PixelData = np.stack([e["ds"].pixel_array for e in entries]).tobytes()
        return [{"name": "enhanced.dcm", "ds": ds}]

    return fn


def _item(**values) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for k, v in values.items():
        setattr(item, k, v)
    return item


def _shift_one_slice(ds):
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [1.0e6]


MR = "1.2.840.10008.5.1.4.1.1.4"
GEOMETRY = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}  # values each
RESCALE = ("RescaleSlope", "RescaleIntercept")
PIXELS = ("pixel data",)
CORRUPT = ("corrupt", "pixel data", "truncat")


def _refuse(name: str, keywords: tuple[str, ...], fn: Callable) -> Mutation:
    return Mutation(name, "refuse", keywords, fn)


def _geometry_mutations() -> list[Mutation]:
    m = []
    for attr, n in GEOMETRY.items():
        kw = (attr,)
        m += [
            _refuse(f"{attr} removed", kw, _each(_delete(attr))),
            _refuse(f"{attr} removed in one file", kw, _one(_delete(attr))),
            _refuse(f"{attr} NaN", kw, _raw_text(attr, "\\".join(["NaN"] * n))),
            _refuse(f"{attr} text", kw, _raw_text(attr, "abc")),
            _refuse(f"{attr} one value", kw, _each(_set(attr, [1.0]))),
        ]
    orientation = ("ImageOrientationPatient", "orientation")
    return m + [
        _refuse("PixelSpacing zero", ("PixelSpacing",), _each(_set("PixelSpacing", [0, 0]))),
        _refuse("PixelSpacing negative", ("PixelSpacing",), _each(_set("PixelSpacing", [-0.5, -0.5]))),
        _refuse("PixelSpacing huge", ("PixelSpacing",), _each(_set("PixelSpacing", [1e6, 1e6]))),
        _refuse("orientation zero", orientation, _each(_set("ImageOrientationPatient", [0] * 6))),
        _refuse(
            "orientation parallel", orientation, _each(_set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]))
        ),
        _refuse("one slice far away", ("gap", "spacing", "position"), _one(_shift_one_slice)),
    ]


def _rescale_mutations() -> list[Mutation]:
    m = [_refuse("RescaleSlope zero", ("RescaleSlope", "rescale"), _each(_set("RescaleSlope", 0)))]
    for attr in RESCALE:
        kw = (attr, "rescale")
        m += [
            _refuse(f"{attr} removed", kw, _each(_delete(attr))),
            _refuse(f"{attr} removed in one file", kw, _one(_delete(attr))),
            _refuse(f"{attr} NaN", kw, _raw_text(attr, "NaN")),
            _refuse(f"{attr} infinite", kw, _raw_text(attr, "inf")),
            _refuse(f"{attr} text", kw, _raw_text(attr, "one")),
            _refuse(f"{attr} huge", kw, _each(_set(attr, 1e30))),
        ]
    return m


def _pixel_mutations() -> list[Mutation]:
    """Pixel data and its description disagreeing, damaged files and compressed streams."""

    def grow(attr: str, by: Callable) -> Callable:
        return _each(lambda ds: setattr(ds, attr, by(int(ds[attr].value))))

    photometric, pi = ("PhotometricInterpretation",), "PhotometricInterpretation"
    return [
        _refuse("Rows doubled", ("pixel data", "Rows"), grow("Rows", lambda v: 2 * v)),
        _refuse("Columns plus one", ("pixel data", "Columns"), grow("Columns", lambda v: v + 1)),
        _refuse("BitsAllocated 8", ("pixel data", "BitsAllocated"), _each(_set("BitsAllocated", 8))),
        _refuse("BitsStored 12", ("pixel data", "BitsStored"), _each(_set("BitsStored", 12))),
        _refuse("PixelRepresentation flipped", ("PixelRepresentation", "pixel data"),
                grow("PixelRepresentation", lambda v: 1 - v)),
        _refuse("SamplesPerPixel 3", ("SamplesPerPixel",), _each(_set("SamplesPerPixel", 3))),
        _refuse("PhotometricInterpretation RGB", photometric, _each(_set(pi, "RGB"))),
        _refuse("PhotometricInterpretation removed", photometric, _each(_delete(pi))),
        _refuse("PixelData removed", PIXELS, _one(_delete("PixelData"))),
        _refuse("NumberOfFrames 3", ("frame", "pixel data"), _each(_set("NumberOfFrames", 3))),
        _refuse("one file truncated in its header", ("truncat", "DICOM", "gap"), _truncate(0.05)),
        _refuse("one file truncated in its pixels", ("truncat", "pixel data"), _truncate(0.7)),
        _refuse("one file cut at its last bytes", ("truncat", "pixel data"), _truncate(0.995)),
        _refuse("every file truncated", ("truncat", "pixel data", "DICOM"), _truncate(0.5, every=True)),
        _refuse("one file empty", ("DICOM", "gap", "truncat"), _truncate(0.0)),
        _refuse("corrupt JPEG 2000", CORRUPT, _compress(JPEG2000Lossless, True)),
        _refuse("corrupt JPEG-LS", CORRUPT, _compress(JPEGLSLossless, True)),
        _refuse("corrupt RLE", CORRUPT, _compress(RLELossless, True)),
    ]  # fmt: skip


def _series_mutations() -> list[Mutation]:
    """Not CT, slices missing or contradicting."""
    return [
        _refuse("Modality MR", ("Modality",), _each(_set("Modality", "MR"))),
        _refuse("Modality removed", ("Modality", "not an image"), _each(_delete("Modality"))),
        _refuse("MR SOP class", ("SOP class", "Modality"), _each(_set("SOPClassUID", MR))),
        _refuse("middle slice missing", ("gap",), _remove_middle),
        _refuse("a slice twice with other pixels", ("same position",), _duplicate(True)),
        _refuse("Enhanced CT, a frame without its plane position", ("plane position", "frame"),
                _as_enhanced("PlanePositionSequence")),
    ]  # fmt: skip


def _meaning_preserving() -> list[Mutation]:
    same = [
        ("a slice twice, identical", _duplicate(False)),
        ("files renamed", _rename),
        ("file names reversed", _reverse_names),
        ("files nested in folders", _nest),
        ("files linked", _link),
        ("PatientName removed", _each(_delete("PatientName"))),
        ("PatientID removed", _each(_delete("PatientID"))),
        ("StudyInstanceUID removed", _each(_delete("StudyInstanceUID"))),
        ("SeriesInstanceUID removed", _each(_delete("SeriesInstanceUID"))),
        ("SOPInstanceUID removed", _each(_delete("SOPInstanceUID"))),
        ("FrameOfReferenceUID removed", _each(_delete("FrameOfReferenceUID"))),
        ("KVP removed", _each(_delete("KVP"))),
        ("KVP text", _raw_text("KVP", "abc")),
        ("SliceThickness removed", _each(_delete("SliceThickness"))),
        ("SliceThickness text", _raw_text("SliceThickness", "abc")),
        ("JPEG 2000 lossless", _compress(JPEG2000Lossless)),
        ("JPEG-LS lossless", _compress(JPEGLSLossless)),
        ("RLE lossless", _compress(RLELossless)),
        ("as one Enhanced CT file", _as_enhanced()),
    ]
    return [Mutation(name, "preserve", (), fn) for name, fn in same]


def _catalogue() -> list[Mutation]:
    return [*_geometry_mutations(), *_rescale_mutations(), *_pixel_mutations(), *_series_mutations(),
            *_meaning_preserving()]  # fmt: skip


MUTATIONS = _catalogue()
