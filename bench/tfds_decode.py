"""Would a TFDS shard format cost the input pipeline? Decode and per-record work, both formats, one run.

  python bench/tfds_decode.py [--records 200] [--size 512] [--repeats 3]

The same records (real-looking 512x512 phantom slices: ``C = 3`` int16 HU slices, the uint8 label and the
scalar fields) serialised two ways: calcjax's own (``calcjax.io.records``: JSON header, raw arrays, CRC-32)
and TFDS's ``tf.train.Example`` without TensorFlow (``FeaturesDict`` of ``Tensor`` features,
``example_serializer.ExampleSerializer`` / ``example_parser.ExampleParserNp`` and ``decode_example_np``,
as ``tfds.data_source`` would read an array_record TFDS dataset). Per format, one JSON line each: records/s
of decode alone, and of decode + the training stream's per-record work (``calcjax.input_pipeline.augment``
on a 96x96 crop, configs/smoke.py), best of ``--repeats``; and ``tfds_over_calcjax`` for both (the issue's
rule: keep TFDS only if the pipeline loses no more than 10%, i.e. the ratio >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import numpy as np
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import example_parser, example_serializer

    from calcjax import input_pipeline
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
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(3, None, None), dtype=np.int16, encoding="bytes"),
            "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="bytes"),
            "scan_id": tfds.features.Text(),
            "slice_index": np.int32,
            "num_slices": np.int32,
            "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "slice_thickness": np.float32,
            "protocol": tfds.features.Text(),
            "kvp": np.float32,
            "has_calcium": np.bool_,
        }
    )
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    parser = example_parser.ExampleParserNp(features.get_serialized_info())
    ours = [records.encode(r) for r in recs]
    theirs = [serializer.serialize_example(features.encode_example(r)) for r in recs]

    def decode_ours(b):
        return records.decode(b)

    def decode_theirs(b):
        return features.decode_example_np(parser.parse_example(b))

    a, t = decode_ours(ours[3]), decode_theirs(theirs[3])
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
            ("calcjax_records", decode_ours, ours),
            ("tfds_example", decode_theirs, theirs),
        ):
            out[(stage, name)] = rate(fn, data, with_augment)
            print(json.dumps({"bench": "tfds_decode", "stage": stage, "format": name, "size": args.size,
                              "bytes_per_record": int(np.mean([len(x) for x in data])),
                              "records_per_s": round(out[(stage, name)], 1)}), flush=True)  # fmt: skip
        ratio = out[(stage, "tfds_example")] / out[(stage, "calcjax_records")]
        print(
            json.dumps({"bench": "tfds_decode", "stage": stage, "tfds_over_calcjax": round(ratio, 3)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
