"""Compilation time of calcjax's programs, cold and from the persistent cache (one JSON line per program).

  python bench/compile.py [--programs smoke_train_step,default_train_step,scorer_forward]

Each program is compiled in a fresh process twice, both with ``CALCJAX_COMPILE_CACHE`` set to one new, empty
folder: ``compile_s`` is the first process's ``jit(...).lower(...).compile()`` (cold: nothing cached),
``cached_s`` the second's (the executable loaded from the cache); ``speedup`` is their ratio. With
``--xla_defaults_baseline`` each train step is compiled once more, cold, with XLA's own compiler options
instead of calcjax's (``calcjax.core.compile_cache.CPU_COMPILER_OPTIONS``): ``xla_defaults_compile_s`` and
``compile_s_vs_xla_defaults``. Programs: the train step (forward, backward, AdamW) of configs/smoke.py at
its training shape (batch 8, 96x96) and of configs/default.py at its own (batch 16, 512x512, bfloat16), and
the scorer's forward (the shipped model, 4 slices of 512x512). The process start and imports are not
counted.

  {"bench": "compile", "config": "smoke", "program": "train_step", "compile_s": ..., "cached_s": ...,
   "speedup": ..., "backend": "cpu"}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = {
    "smoke_train_step": ("smoke", "train_step"),
    "default_train_step": ("default", "train_step"),
    "scorer_forward": ("shipped", "forward"),
}


def train_step_of(config: str, xla_defaults: bool = False):
    """(jitted train step, fresh train state, model config, config) of ``configs/<config>.py`` (with XLA's
    default compiler options instead of calcjax's: ``xla_defaults``)."""
    import importlib

    from calcjax.model import network
    from calcjax.train import step as ts

    cfg = importlib.import_module(f"configs.{config}").get_config()
    mcfg = network.ModelConfig.from_config(cfg.model)
    net = network.new_model(mcfg, 0)
    tx = ts.make_optimizer(learning_rate=1e-3, warmup_steps=10, total_steps=1000, weight_decay=1e-4,
                           grad_clip=1.0)  # fmt: skip
    graphdef, state = ts.create_state(net, tx)
    extra = {"compiler_options": None} if xla_defaults else {}
    step = ts.make_train_step(graphdef, tx, ts.LossConfig.from_config(cfg.loss), **extra)
    return step, state, mcfg, cfg


def _train_step_lowered(config: str, xla_defaults: bool = False):
    """The train step of ``configs/<config>.py`` (:func:`train_step_of`) lowered at its training shape."""
    import jax
    import jax.numpy as jnp

    step, state, mcfg, cfg = train_step_of(config, xla_defaults)
    b, s = cfg.train.batch_size, cfg.data.crop
    images = jax.ShapeDtypeStruct((b, s, s, mcfg.in_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((b, s, s), jnp.int32)
    return step.lower(state, images, labels)


def _forward_lowered():
    """The scorer's forward (the shipped model, its batch of 4 slices at 512x512) lowered."""
    import jax
    import jax.numpy as jnp

    from calcjax.inference.predictor import Predictor

    p = Predictor.from_checkpoint(None)
    images = jax.ShapeDtypeStruct((p.batch_size, 512, 512, p.in_channels), jnp.float32)
    return p._forward.lower(p._state, images)


def child(config: str, program: str) -> None:
    """In a fresh process: the seconds ``compile()`` takes (printed as JSON)."""
    from calcjax.core import compile_cache

    compile_cache.enable()
    if program == "forward":
        lowered = _forward_lowered()
    else:
        lowered = _train_step_lowered(config, xla_defaults=program == "train_step_xla_defaults")
    t0 = time.perf_counter()
    lowered.compile()
    import jax

    print(json.dumps({"seconds": time.perf_counter() - t0, "backend": jax.default_backend()}))


def run_child(script: str, child: str, cache: str) -> dict:
    """``python SCRIPT --child CHILD`` in a fresh process with ``CALCJAX_COMPILE_CACHE=cache``: the JSON
    object its last line prints."""
    env = {**os.environ, "CALCJAX_COMPILE_CACHE": cache}
    done = subprocess.run([sys.executable, script, "--child", child], cwd=ROOT, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compile_in_fresh_process(config: str, program: str, cache: str) -> dict:
    return run_child(__file__, f"{config}:{program}", cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--xla_defaults_baseline", action="store_true",
                   help="also compile each train step cold with XLA's default compiler options")  # fmt: skip
    args = p.parse_args()
    if args.child:
        child(*args.child.split(":"))
        return
    for name in args.programs.split(","):
        config, program = PROGRAMS[name]
        with tempfile.TemporaryDirectory(prefix="calcjax-compile-bench-") as cache:
            cold = _compile_in_fresh_process(config, program, cache)
            cached = _compile_in_fresh_process(config, program, cache)
        line = {"bench": "compile", "config": config, "program": program,
                "compile_s": round(cold["seconds"], 3), "cached_s": round(cached["seconds"], 3),
                "speedup": round(cold["seconds"] / max(cached["seconds"], 1e-9), 1),
                "backend": cold["backend"]}  # fmt: skip
        if program == "train_step" and args.xla_defaults_baseline:
            with tempfile.TemporaryDirectory(prefix="calcjax-compile-bench-") as cache:
                base = _compile_in_fresh_process(config, "train_step_xla_defaults", cache)
            line["xla_defaults_compile_s"] = round(base["seconds"], 3)
            line["compile_s_vs_xla_defaults"] = round(cold["seconds"] / base["seconds"], 3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
