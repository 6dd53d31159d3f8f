"""Two jax processes on localhost (``jax.distributed`` with the coordinator on 127.0.0.1, CPU devices, one
per process) against one process with the same global batch: training and scoring agree.

Run alone with ``pytest -m multiprocess``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from xla_env import xla_flags

from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # training steps of each run
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of 6 small labelled phantoms (64x64): train, val and test splits."""
    base = tmp_path_factory.mktemp("mp_data")
    for i in range(6):
        scan = generate_scan(9, i, "cardiac", size=64, target_category=(i % 4) + 1)
        write_scan(scan, str(base / "in"), seed=9, index=i)
    out = str(base / "shards")
    builder.build(
        builder.BuildOptions(
            str(base / "in"),
            out,
            split="train=0.5,val=0.25,test=0.25",
            salt="multiprocess-salt-6",
            progress=False,
        )
    )
    with open(os.path.join(out, "manifest.json")) as f:
        splits = json.load(f)["splits"]
    assert all(splits.get(s, {}).get("num_records") for s in ("train", "val", "test")), splits
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], processes: int, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Runs ``python args`` as ``processes`` jax processes (1: plain) on CPU; all must succeed."""
    # Without the test run's XLA compilation cache (conftest.py): two jax.distributed processes sharing it
    # aborted at shutdown (a coordination-service error) in a run beside a training, where without it they
    # had passed; these runs compile anyway. One CPU device per process, whatever the run was given.
    base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    base.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(), CALCJAX_COMPILE_CACHE="off")
    if processes == 1:
        procs = [
            subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=base,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        ]
    else:
        port = _free_port()
        procs = []
        for i in range(processes):
            env = dict(
                base,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(processes),
                JAX_PROCESS_ID=str(i),
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


def _train_args(shards: str, workdir: str) -> list[str]:
    return [
        "-m",
        "calcjax.train",
        "--config",
        os.path.join(ROOT, "configs", "smoke.py"),
        "--workdir",
        workdir,
        f"--config.data.shards={shards}",
        "--config.data.crop=32",
        "--config.train.batch_size=4",
        f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=3",
        f"--config.train.eval_every={STEPS}",
        "--config.train.log_every=1",
    ]


def _params(workdir: str) -> dict:
    from flax import nnx

    from calcjax.model import checkpoint

    _, model = checkpoint.load_for_inference(workdir, "latest")
    return {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_process_training_equals_one_process(shards, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(_train_args(shards, one), processes=1)
    _run(_train_args(shards, two), processes=2)
    m1, m2 = _metrics(one), _metrics(two)
    loss1 = [m["train_loss"] for m in m1 if "train_loss" in m]
    loss2 = [m["train_loss"] for m in m2 if "train_loss" in m]
    assert len(loss1) == len(loss2) == STEPS
    # Process i reads elements i, i+2, ... of the same stream: each global batch holds the same slices as
    # the one-process batch (in another order), so losses and updates agree to float32 summation order.
    np.testing.assert_allclose(loss2, loss1, rtol=1e-4)
    val1 = next(m for m in m1 if "val_voxel_f1" in m)
    val2 = next(m for m in m2 if "val_voxel_f1" in m)
    assert val1["val_scans"] == val2["val_scans"] >= 1
    # Validation ran on both processes' scans and gathered them: the same scans, nearly the same weights.
    np.testing.assert_allclose(val2["val_loss"], val1["val_loss"], rtol=1e-2)
    p1, p2 = _params(one), _params(two)
    assert p1.keys() == p2.keys()
    worst = max(float(np.abs(p1[k] - p2[k]).max()) for k in p1)
    assert worst < 1e-4, worst  # (smoke's warm-up keeps the learning rate small: Adam amplifies rounding)


def test_two_process_scoring_merges_to_the_one_process_scores(shards, tmp_path):
    # With the shipped model (no --checkpoint): any weights do, and the training subprocess this test ran
    # for a checkpoint until 2026-12-01 was a third of its time.
    outs = {}
    for n in (1, 2):
        out = str(tmp_path / f"score{n}")
        _run(
            [
                "-m",
                "calcjax.score",
                "--shards",
                os.path.join(shards, "*.array_record"),
                "--out",
                out,
                "--num_bootstrap",
                "20",
            ],
            processes=n,
        )
        with open(os.path.join(out, "scores.jsonl")) as f:
            outs[n] = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]
        assert os.path.isfile(os.path.join(out, "report.md"))
    assert len(outs[1]) == 6
    assert outs[2] == outs[1]  # the same rows in the same (scan) order
    assert os.path.isdir(str(tmp_path / "score2" / "parts"))
