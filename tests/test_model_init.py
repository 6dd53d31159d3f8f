"""A model's initial weights drawn as one compiled program, and model files loaded into a frame of shapes:
nothing drawn, nothing compiled, and a file whose arrays do not fit its config refused naming the array."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx, serialization

from calcjax.model import files as model_file
from calcjax.model import network as model_lib
from configs import smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# JAX records this event for every program it compiles or loads from the persistent cache.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def programs_compiled():
    """The names of the programs compiled (or loaded from the persistent cache) inside the block."""
    seen: list[str] = []

    def listener(event: str, duration_secs: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            seen.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _smoke():
    config = smoke.get_config().to_dict()
    return config, model_lib.ModelConfig.from_config(config["model"])


def test_new_model_draws_the_layers_weights_in_one_program_for_every_seed():
    # A small architecture no other test builds, so that nothing of it is compiled in this process yet.
    cfg = dataclasses.replace(
        _smoke()[1], stem_features=6, widths=(6, 10), block_layers=(1, 2), growth_rate=5, bottleneck_width=14,
        bottleneck_growth=7, dilations=(1, 3), decoder_layers=(2, 1),
    )  # fmt: skip
    with programs_compiled() as first:
        model = model_lib.new_model(cfg, 3)
    with programs_compiled() as second:
        other = model_lib.new_model(cfg, 4)
    # One program for the weights (beside the seed's key and a transfer), not one per array shape
    # (jit(_normal), jit(multiply), jit(broadcast_in_dim), ...: about 100 for the smoke model).
    assert "jit(draw)" in first and len(first) <= 3 and not any("normal" in n for n in first), first
    assert second == [], second  # another seed: the same program
    layers = model_lib.DenseRAUnet(cfg, rngs=nnx.Rngs(3))  # drawn op by op, as the layers do
    assert nnx.graphdef(model) == nnx.graphdef(layers)
    ours, theirs = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(layers))
    assert len(ours) == len(theirs) > 50
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)  # float rounding
    assert not np.allclose(np.asarray(model.stem.kernel), np.asarray(other.stem.kernel))


def test_a_model_file_loads_without_drawing_or_compiling_anything(tmp_path):
    config, cfg = _smoke()
    model = model_lib.new_model(cfg, 5)
    path = str(tmp_path / "m.msgpack")
    model_file.save(path, config, model)
    with programs_compiled() as seen:
        _, loaded, _ = model_file.load(path)
    assert seen == []
    np.testing.assert_array_equal(np.asarray(loaded.head.kernel), np.asarray(model.head.kernel))


def _remove_head_bias(payload):
    del payload["params"]["head"]["bias"]


def _add_a_statistic(payload):
    payload["batch_stats"]["head_bn"]["extra"] = np.zeros(3, np.float32)


def _narrow_the_stem(payload):
    payload["params"]["stem"]["kernel"] = np.zeros((3, 3, 3, 8), np.float32)


@pytest.mark.parametrize(
    "change, message",
    [
        (_remove_head_bias, r"params lacks 1 arrays .* \(e\.g\. head/bias\)"),
        (_add_a_statistic, r"batch_stats holds 1 arrays .* \(e\.g\. head_bn/extra\)"),
        (_narrow_the_stem, r"params stem/kernel has shape \(3, 3, 3, 8\); .* needs \(3, 3, 3, 16\)"),
    ],
)
def test_a_model_file_whose_arrays_do_not_fit_its_config_is_refused_naming_them(tmp_path, change, message):
    config, cfg = _smoke()
    path = str(tmp_path / "m.msgpack")
    model_file.save(path, config, model_lib.new_model(cfg, 5))
    with open(path, "rb") as f:
        payload = serialization.msgpack_restore(f.read())
    change(payload)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(payload))
    with open(path + ".sha256", "w") as f:  # a well-formed file with a matching digest
        f.write(f"{model_file.sha256_of(path)}  {os.path.basename(path)}\n")
    with pytest.raises(model_file.ModelFileError, match=f"^{path}: {message}"):
        model_file.load(path)


@pytest.mark.parametrize("way", ["calcjax", "op_by_op"])
def test_the_startup_benchs_model_file_load_runs_both_ways(tmp_path, way):
    """``bench/startup.py``'s measurement in a fresh process (the figures themselves are the bench's)."""
    from bench.compile import run_child

    script = os.path.join(ROOT, "bench", "startup.py")
    got = run_child(script, f"model_file_load:shipped:{way}", str(tmp_path))
    assert got["seconds"] > 0 and got["backend"] == "cpu"
    assert os.listdir(tmp_path)  # the run used the cache folder it was given
