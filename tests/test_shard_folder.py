"""The shard folder's one home (calcjax.io.shards): the builder's manifest reads back typed; training,
validation and scoring read a scan through the same reader, with the same errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from calcjax.data import input_pipeline, scan_sources
from calcjax.io import records, shards
from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("shard_folder")
    for i, protocol in enumerate(("cardiac", "chest")):
        write_scan(
            generate_scan(53, i, protocol, size=48, target_category=2), str(base / "in"), seed=53, index=i
        )
    out = str(base / "shards")
    builder.build(
        builder.BuildOptions(str(base / "in"), out, split="train=1", records_per_shard=40, progress=False)
    )
    return out


def test_the_builders_manifest_reads_back_typed(folder):
    m = shards.Manifest.read(folder)
    with open(os.path.join(folder, shards.MANIFEST)) as f:
        raw = json.load(f)
    assert m.context == raw["settings"]["context"] == 1
    assert [s.scan_id for s in m.scans] == [s["scan_id"] for s in raw["scans"]]
    split = m.split("train")
    assert split.num_records == sum(s.num_records for s in split.scans) == raw["num_records"]
    for s in split.scans:
        assert s.split == "train" and s.shard in {os.path.basename(p) for p in split.paths}
        assert len(s.spacing) == 3 and s.labelled
    # calcium_records index the split-wide record numbers of slices with calcium.
    assert split.calcium_records.size and split.calcium_records.max() < split.num_records
    with pytest.raises(ValueError, match=r"has no split 'val'; it has \['train'\]"):
        m.split("val")


def test_training_validation_and_scoring_read_the_same_arrays(folder):
    split = input_pipeline.ShardSplit.load(folder, "train")
    by_eval = {item["scan"].scan_id: item for item in input_pipeline.iter_scans(split)}
    scans, readers = scan_sources.shard_scans(os.path.join(folder, "*.array_record"), context=1)
    try:
        assert {s.scan_id for s in scans} == set(by_eval)
        for s in scans:
            loaded = s.load()
            item = by_eval[s.scan_id]
            np.testing.assert_array_equal(loaded.hu, item["hu"])
            np.testing.assert_array_equal(loaded.labels, item["labels"])
    finally:
        readers.close()


def test_the_folder_is_a_tfds_dataset_read_the_same_way(folder):
    """tfds.builder_from_directory reads the builder's own files (no copy), and its decoded examples are
    the records calcjax decodes: same arrays, same scalars, in the same order across shards."""
    import tensorflow_datasets as tfds

    split = shards.Manifest.read(folder).split("train")
    assert len(split.paths) == 2  # two shards: the TFDS index runs across shard boundaries
    builder_ = tfds.builder_from_directory(folder)
    assert builder_.info.name == shards.TFDS_NAME
    assert builder_.info.splits["train"].num_examples == split.num_records
    source = builder_.as_data_source("train")
    assert len(source) == split.num_records
    ours = [b for path in split.paths for b in _raw_records(path)]
    for i in range(split.num_records):
        theirs, mine = source[i], records.decode(ours[i])
        np.testing.assert_array_equal(theirs["image"], mine["image"])
        np.testing.assert_array_equal(theirs["label"], mine["label"])
        assert theirs["scan_id"].decode() == mine["scan_id"] and theirs["slice_index"] == mine["slice_index"]
        np.testing.assert_array_equal(theirs["spacing"], mine["spacing"])
    # and the split's calcium index points at records whose TFDS label has calcium
    assert all(source[int(i)]["has_calcium"] and source[int(i)]["label"].any() for i in split.calcium_records)


def _raw_records(path):
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return reader.read_all()
    finally:
        reader.close()


def test_a_folder_of_the_earlier_record_format_is_refused_with_rebuild(folder, tmp_path):
    old = str(tmp_path / "old")
    shutil.copytree(folder, old)
    with open(os.path.join(old, shards.MANIFEST)) as f:
        manifest = json.load(f)
    manifest["manifest_version"] = 1
    with open(os.path.join(old, shards.MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(shards.NotAShardFolderError, match="manifest version 1.*rebuild the folder"):
        shards.Manifest.read(old)


def test_a_folder_without_or_with_a_broken_manifest_is_one_clear_error_on_every_route(folder, tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    open(os.path.join(empty, "train-00000-of-00001.array_record"), "wb").close()
    for read in (
        lambda: input_pipeline.ShardSplit.load(empty, "train"),
        lambda: scan_sources.shard_scans(os.path.join(empty, "*.array_record"), context=1),
    ):
        with pytest.raises(
            shards.NotAShardFolderError, match="has no manifest.json: is it a data_prep.build"
        ):
            read()
    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken)
    with open(os.path.join(broken, shards.MANIFEST), "w") as f:
        f.write('{"scans": [')
    with pytest.raises(shards.NotAShardFolderError, match="not a readable shard manifest.*rebuild"):
        shards.Manifest.read(broken)


def test_a_damaged_shard_is_a_record_error_naming_shard_and_scan_on_every_route(folder, tmp_path):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(folder, damaged)
    split = input_pipeline.ShardSplit.load(damaged, "train")
    first = split.scans[0]
    path = os.path.join(damaged, first.shard)
    with open(path, "r+b") as f:  # overwrite the middle of the first shard's data
        f.seek(os.path.getsize(path) // 3)
        f.write(b"\x00" * 4096)
    with pytest.raises(records.RecordError, match=rf"{first.shard}, scan {first.scan_id}"):
        list(input_pipeline.iter_scans(split))
    scans, readers = scan_sources.shard_scans(os.path.join(damaged, "*.array_record"), context=1)
    try:
        with pytest.raises(records.RecordError, match=rf"{first.shard}, scan {first.scan_id}"):
            scans[0].load()
    finally:
        readers.close()


def test_every_bit_flip_in_a_shard_is_refused_by_the_reader_or_misses_the_records(folder, tmp_path):
    """The records carry no checksum of their own (calcjax.io.records): ArrayRecord's hashed Riegeli chunks
    are what catch damage. One bit flipped at 40 places across a shard: read_scan either raises a
    RecordError naming the shard, or returns exactly the undamaged arrays (the flip hit padding)."""
    split = input_pipeline.ShardSplit.load(folder, "train")
    scan = split.scans[0]
    path = os.path.join(folder, scan.shard)
    with shards.Readers() as readers:
        want = shards.read_scan(readers.get(path), scan, split.context)
    data = open(path, "rb").read()
    rng = np.random.default_rng(20261130)
    refused = 0
    for i, at in enumerate(rng.integers(0, len(data), 40)):
        damaged = bytearray(data)
        damaged[at] ^= 1 << int(rng.integers(0, 8))
        copy = tmp_path / f"flip-{i}.array_record"
        copy.write_bytes(bytes(damaged))
        with shards.Readers() as readers:
            try:
                got = shards.read_scan(readers.get(str(copy)), scan, split.context)
            except records.RecordError as e:  # from the reader, or from opening the file
                assert scan.shard in str(e) or copy.name in str(e)
                refused += 1
                continue
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert refused >= 20  # most of a shard is record data


def test_validation_runs_the_scorers_forward_pass(folder):
    """calcjax.train.evaluation predicts through calcjax.inference.predictor.Predictor: the same labels as the
    scorer's predict on the same weights, and figures from the one shared function."""
    import optax
    from flax import nnx

    from calcjax.core import metrics
    from calcjax.inference import predictor as inference
    from calcjax.model import network as model_lib
    from calcjax.train import evaluation
    from calcjax.train import step as ts
    from configs import smoke

    c = smoke.get_config()
    model = model_lib.new_model(model_lib.ModelConfig.from_config(c.model), 3)
    graphdef, state = ts.create_state(model, optax.sgd(0.1))
    loss_cfg = ts.LossConfig.from_config(c.loss)
    evaluator = evaluation.Evaluator(graphdef, 4, loss_cfg, state.params, state.batch_stats)
    split = input_pipeline.ShardSplit.load(folder, "train")
    got = evaluator.evaluate(state, split)

    scorer = inference.Predictor(nnx.merge(graphdef, state.params, state.batch_stats), batch_size=4)
    summaries, loss_sum, slices = [], 0.0, 0
    for item in input_pipeline.iter_scans(split):
        pred = scorer.predict(item["hu"])
        again, loss = evaluator.predictor.predict_with_loss(item["hu"], item["labels"])
        np.testing.assert_array_equal(again, pred)
        assert np.isfinite(loss) and loss > 0
        loss_sum, slices = loss_sum + loss, slices + len(pred)
        scan = item["scan"]
        summaries.append(
            metrics.summarize_scan(
                scan.scan_id, scan.protocol, pred, item["labels"], item["hu"], scan.spacing
            )
        )
    assert sum(int((s.voxel_tp + s.voxel_fp) > 0) for s in summaries) > 0  # it predicts some calcium
    assert got == evaluation.validation_figures(summaries, loss_sum, slices)

    # The real-sample figure: the same, with the scorer's heart region applied to each prediction.
    from calcjax.inference import heart_region

    regional = []
    for item in input_pipeline.iter_scans(split):
        scan = item["scan"]
        pred = heart_region.restrict(
            scorer.predict(item["hu"]), heart_region.heart_region(item["hu"], scan.spacing)
        )
        regional.append(
            metrics.summarize_scan(
                scan.scan_id, scan.protocol, pred, item["labels"], item["hu"], scan.spacing
            )
        )
    real = evaluator.evaluate(state, split, use_heart_region=True, prefix="real")
    assert real == evaluation.validation_figures(regional, loss_sum, slices, "real")
    assert set(real) == {k.replace("val_", "real_") for k in got}
