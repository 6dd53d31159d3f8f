"""What a process pays before its first train step or first scan: a model's initial weights with a fresh
train state, and a model file's load; as calcjax does them and op by op (one JSON line per figure).

  python bench/startup.py [--configs smoke,default] [--repeats 2]

Each figure is the median of ``--repeats`` fresh processes with one new, empty persistent compilation cache
per process (``CALCJAX_COMPILE_CACHE``: nothing cached, as on a first run) and of as many more sharing one
cache (``cached``: as every later run). Imports are not counted. The two ways, timed in the same command:

- ``new_model_and_state``: ``calcjax.model.network.new_model`` (the weights as one compiled program) and
  ``calcjax.train.step.create_state`` (one program), against ``DenseRAUnet(cfg, rngs=nnx.Rngs(0))`` and the
  optimizer state built op by op (one small program per array shape, too quick each for the cache);
- ``model_file_load`` (the shipped model): ``calcjax.model.files.load`` (the weights put into a frame of
  shapes), against building the model op by op first and putting the weights in after.

  {"bench": "startup", "config": "smoke", "what": "new_model_and_state", "cache": "cold", "seconds": ...,
   "op_by_op_seconds": ..., "speedup": ..., "backend": "cpu"}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.compile import run_child  # noqa: E402


def _op_by_op_state(net, tx):
    """The train state of ``net`` built op by op (the optimizer's zeros one program per array shape)."""
    import jax.numpy as jnp
    from flax import nnx

    from calcjax.train import step as ts

    _, params, batch_stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    zero = jnp.zeros((), jnp.int32)
    return ts.TrainState(step=zero, params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                         skipped=zero, bad_in_a_row=zero)  # fmt: skip


def _new_model_and_state(config: str, op_by_op: bool):
    """A fresh train state of ``configs/<config>.py``'s model, with its initial weights drawn from seed 0."""
    import importlib

    from flax import nnx

    from calcjax.model import network
    from calcjax.train import step as ts

    mcfg = network.ModelConfig.from_config(importlib.import_module(f"configs.{config}").get_config().model)
    tx = ts.make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=1000, weight_decay=1e-4,
                           grad_clip=1.0)  # fmt: skip
    if op_by_op:
        return _op_by_op_state(network.DenseRAUnet(mcfg, rngs=nnx.Rngs(0)), tx)
    return ts.create_state(network.new_model(mcfg, 0), tx)[1]


def _model_file_load(op_by_op: bool):
    """The shipped model's weights, loaded."""
    from flax import nnx, serialization

    from calcjax.model import files, network

    if not op_by_op:
        return nnx.state(files.load(files.DEFAULT_MODEL)[1])
    with open(files.DEFAULT_MODEL, "rb") as f:
        payload = serialization.msgpack_restore(f.read())
    mcfg = network.ModelConfig.from_saved(json.loads(payload["config"])["model"])
    drawn = network.DenseRAUnet(mcfg, rngs=nnx.Rngs(0))
    graphdef, params, batch_stats = nnx.split(drawn, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(params, payload["params"])
    nnx.replace_by_pure_dict(batch_stats, payload["batch_stats"])
    return nnx.state(nnx.merge(graphdef, params, batch_stats))


def child(what: str, config: str, way: str) -> None:
    """In a fresh process: the seconds of ``what`` done ``way`` (printed as JSON)."""
    import jax

    from calcjax.core import compile_cache

    compile_cache.enable()
    op_by_op = way == "op_by_op"
    t0 = time.perf_counter()
    if what == "model_file_load":
        out = _model_file_load(op_by_op)
    else:
        out = _new_model_and_state(config, op_by_op)
    jax.block_until_ready(jax.tree.leaves(out))
    print(json.dumps({"seconds": time.perf_counter() - t0, "backend": jax.default_backend()}))


def _in_fresh_process(what: str, config: str, way: str, cache: str) -> dict:
    return run_child(__file__, f"{what}:{config}:{way}", cache)


def seconds(what: str, config: str, way: str, repeats: int) -> dict:
    """Median seconds over ``repeats`` processes each with an empty cache (``cold``) and over ``repeats``
    more sharing one cache filled by a first, uncounted process (``cached``); the backend."""
    cold = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="calcjax-startup-bench-") as cache:
            cold.append(_in_fresh_process(what, config, way, cache))
    with tempfile.TemporaryDirectory(prefix="calcjax-startup-bench-") as cache:
        _in_fresh_process(what, config, way, cache)
        cached = [_in_fresh_process(what, config, way, cache) for _ in range(repeats)]
    return {
        "cold": statistics.median(r["seconds"] for r in cold),
        "cached": statistics.median(r["seconds"] for r in cached),
        "backend": cold[0]["backend"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="smoke,default")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child.split(":"))
        return
    jobs = [("new_model_and_state", c) for c in args.configs.split(",")] + [("model_file_load", "shipped")]
    for what, config in jobs:
        ours = seconds(what, config, "calcjax", args.repeats)
        theirs = seconds(what, config, "op_by_op", args.repeats)
        for cache in ("cold", "cached"):
            line = {"bench": "startup", "config": config, "what": what, "cache": cache,
                    "seconds": round(ours[cache], 3), "op_by_op_seconds": round(theirs[cache], 3),
                    "speedup": round(theirs[cache] / max(ours[cache], 1e-9), 1),
                    "backend": ours["backend"]}  # fmt: skip
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
