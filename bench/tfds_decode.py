"""Did the TFDS shard format cost the input pipeline? Decode and per-record work, both formats, one run.

  python bench/tfds_decode.py [--records 200] [--size 512] [--repeats 3]

The same records (real-looking 512x512 phantom slices: ``C = 3`` int16 HU slices, the uint8 label and the
scalar fields) serialised two ways: calcjax's record today (``calcjax.io.records``: a TFDS
``tf.train.Example`` of ``records.FEATURES``, decoded by TFDS's ``deserialize_example_np`` without
TensorFlow, plus its schema and shape checks; no CRC, since ArrayRecord's chunks are hashed) and the
baseline, calcjax's earlier record (schema 1: JSON header, raw arrays, CRC-32; its codec is kept below only
as this baseline). Per format, one JSON line each: records/s of decode alone, and of decode + the training
stream's per-record work (``calcjax.data.input_pipeline.augment`` on a 96x96 crop, configs/smoke.py), best of
``--repeats``; and ``tfds_over_schema1`` for both (the rule: keep TFDS only if the pipeline loses
no more than 10%, i.e. the ratio >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _encode_schema1(record: dict) -> bytes:
    """The schema-1 record (the baseline): MAGIC, header length (uint32 LE), JSON header, raw arrays."""
    import numpy as np

    arrays, chunks, offset = {}, [], 0
    for name, dtype in (("image", "<i2"), ("label", "u1")):
        a = np.ascontiguousarray(record[name], dtype=dtype)
        arrays[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
        chunks.append(a.tobytes())
        offset += a.nbytes
    payload = b"".join(chunks)
    header = {k: v for k, v in record.items() if k not in ("image", "label")}
    header.update(schema_version=1, arrays=arrays, payload_bytes=len(payload), crc32=zlib.crc32(payload))
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"CJXR" + struct.pack("<I", len(head)) + head + payload


def _decode_schema1(data: bytes) -> dict:
    """The schema-1 decoder as it was (checks magic, lengths, version and CRC; arrays without copying)."""
    import numpy as np

    data = memoryview(data)
    if bytes(data[:4]) != b"CJXR":
        raise ValueError("bad magic")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(bytes(data[8 : 8 + n]))
    payload = data[8 + n :]
    if header["schema_version"] != 1 or len(payload) != header["payload_bytes"]:
        raise ValueError("bad record")
    if zlib.crc32(payload) != header["crc32"]:
        raise ValueError("checksum")
    out = {k: v for k, v in header.items() if k not in ("arrays", "payload_bytes", "crc32")}
    for name, spec in header["arrays"].items():
        count = int(np.prod(spec["shape"]))
        out[name] = np.frombuffer(payload, spec["dtype"], count, spec["offset"]).reshape(spec["shape"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import numpy as np

    from calcjax.data import input_pipeline
    from calcjax.io import records
    from configs import smoke
    from data_prep.phantom.generator import generate_scan

    scan = generate_scan(5, 1, "cardiac", size=args.size, target_category=3)
    hu = np.clip(np.rint(scan.hu), -32768, 32767).astype(np.int16)
    lab = scan.label.astype(np.uint8)
    z = hu.shape[0]
    recs = []
    for i in range(args.records):
        k = i % z
        idx = records.stack_indices(k, z, 1)
        recs.append(
            {
                "scan_id": "scan-0123456789abcdef",
                "slice_index": k,
                "num_slices": z,
                "spacing": [3.0, 0.39, 0.39],
                "slice_thickness": 3.0,
                "protocol": "cardiac",
                "kvp": 120.0,
                "has_calcium": bool(lab[k].any()),
                "image": hu[idx],
                "label": lab[k],
            }
        )
    ours = [records.encode(r) for r in recs]
    baseline = [_encode_schema1(r) for r in recs]
    a, t = _decode_schema1(baseline[3]), records.decode(ours[3])
    assert np.array_equal(a["image"], t["image"]) and np.array_equal(a["label"], t["label"])
    aug = input_pipeline.AugmentConfig.from_config(smoke.get_config().data)

    def rate(fn, data, with_augment: bool) -> float:
        best = 0.0
        for r in range(args.repeats):
            rng = np.random.default_rng(r)
            t0 = time.perf_counter()
            for b in data:
                rec = fn(b)
                if with_augment:
                    input_pipeline.augment(rec["image"], rec["label"], aug, rng)
            best = max(best, len(data) / (time.perf_counter() - t0))
        return best

    out = {}
    for stage, with_augment in (("decode", False), ("decode_and_augment", True)):
        for name, fn, data in (
            ("schema1_json_header", _decode_schema1, baseline),
            ("tfds_example", records.decode, ours),
        ):
            out[(stage, name)] = rate(fn, data, with_augment)
            print(json.dumps({"bench": "tfds_decode", "stage": stage, "format": name, "size": args.size,
                              "bytes_per_record": int(np.mean([len(x) for x in data])),
                              "records_per_s": round(out[(stage, name)], 1)}), flush=True)  # fmt: skip
        ratio = out[(stage, "tfds_example")] / out[(stage, "schema1_json_header")]
        print(
            json.dumps({"bench": "tfds_decode", "stage": stage, "tfds_over_schema1": round(ratio, 3)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
