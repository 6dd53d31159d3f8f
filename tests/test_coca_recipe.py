"""The COCA recipe (``make train-coca``) end to end on the real sample, which is laid out as the release is:
build with patient-level splits, train, score the gated test split against its masks and the chest scans
against the release's own sheet (no key-suffix flag). A CPU-sized network and a handful of steps stand in
for configs/coca.py's paper network here; the config itself is checked to be the paper's network."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from calcjax.io import outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.environ.get("CALCJAX_REAL_DATA") or os.path.join(os.path.dirname(ROOT), "shared", "data")
COCA = os.path.join(REAL, "coca-sample")

# The smoke network and a few steps: the chain, not the training, is under test.
SMALL = (
    "--config.model.stem_features=16 --config.model.widths='(16,32,64)' "
    "--config.model.block_layers='(2,2,2)' "
    "--config.model.growth_rate=8 --config.model.bottleneck_width=128 --config.model.bottleneck_growth=16 "
    "--config.model.dilations='(1,2,4)' --config.model.decoder_layers='(2,2,2)' --config.model.dtype=float32 "
    "--config.data.crop=96 --config.data.worker_count=0 --config.train.batch_size=2 --config.train.steps=4 "
    "--config.train.warmup_steps=1 --config.train.eval_every=4 --config.train.checkpoint_every=4"
)


def test_the_coca_config_is_the_papers_network():
    import jax
    from flax import nnx

    from calcjax.model import network
    from configs import coca

    c = coca.get_config()
    cfg = network.ModelConfig.from_config(c.model)
    model = network.abstract_model(cfg)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 3.0e6 < params < 3.6e6, params
    assert c.data.crop == 512 and c.train.batch_size == 16 and c.model.dtype == "bfloat16"


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(COCA), reason=f"real sample not found at {REAL} (set CALCJAX_REAL_DATA)"
)
def test_make_train_coca_runs_end_to_end_on_the_release_layout(tmp_path):
    out = tmp_path / "coca_out"
    # Salt and split seed chosen so that the sample's three patients fall one in each split.
    build = "--split train=0.34,val=0.33,test=0.33 --salt coca-recipe-test --split_seed 2"
    done = subprocess.run(
        ["make", "-s", "train-coca", f"COCA={COCA}", f"COCA_OUT={out}", f"COCA_BUILD_FLAGS={build}",
         f"COCA_TRAIN_FLAGS={SMALL}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.load(open(out / "gated" / "manifest.json"))
    assert {s["split"] for s in manifest["scans"]} == {"train", "val", "test"}
    assert (
        len(manifest["scans"]) == 3 and json.load(open(out / "gated" / "build.json"))["split_by"] == "patient"
    )
    (gated,) = outputs.read_jsonl(str(out / "score-gated" / outputs.SCORES))
    assert "evaluation" in gated and gated["protocol"] == "cardiac"
    chest = outputs.read_jsonl(str(out / "score-chest" / outputs.SCORES))
    assert sorted(r["reference_agatston"] for r in chest) == [0.0, 300.0]  # both sheet rows, no flag
    assert {r["reference_source"] for r in chest} == {"sheet"}
    for report in ("score-gated", "score-chest"):
        assert "Risk category" in open(out / report / "report.md").read()
