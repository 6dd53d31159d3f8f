"""The device work of one accelerator session, staged so that the first minutes give the figures that
matter most, each written before the next stage starts (the last session lost its time to a compilation
that never finished).

  python bench/device_run.py --out OUT [--budget_s 780] [--config default] [--size 512] [--scans 80] \
      [--workers 12] [--autotune_level 0] [--torch_variants eager,channels_last,compile] [--pin_site DIR]

Each figure is one JSON line on stdout and in ``OUT/session.jsonl`` (``t_s``: seconds since the start);
everything the stages print goes to ``OUT/session.log``. In order, each bounded by what is left of
``--budget_s``:

1. ``machine`` and ``preflight``: the device and package versions, a tiny jitted train step (with the
   ``--pin_site`` wheels first on the path if the machine's own packages fail).
2. ``compile``: the config's train step (batch 16 at 512x512, bfloat16, for the default config) compiled
   cold and then from the persistent cache, each in a fresh process (``bench/compile.py``), with XLA's GPU
   autotuning at ``--autotune_level`` (``XLA_FLAGS=--xla_gpu_autotune_level=N`` for every stage; 0 turns
   autotuning off: the last device run's compilation did not finish in 165 s under XLA's default).
   Phantoms and shards are built in the background from here on.
3. ``train_step_one_device``: JAX and the PyTorch twin (``--torch_variants``) step time, slices/s and
   MFU in bfloat16, then JAX in float32 (``bench/gpu_step.py``).
4. ``score``: the scorer's scans/min and forward share (``bench/score.py``).
5. ``input_pipeline``: the grain training stream alone (batches/s), once the shards exist.
6. ``score_pipeline``: the pipelined scorer against the serial one (scans/min, forward share, the speedup,
   the host work's scaling from 1 to ``--score_workers`` workers; ``bench/score.py --pipeline``) on the
   first ``--pipeline_scans`` phantoms.
7. ``train``: ``calcjax.train`` with the config for the time left (warm-up and cosine decay over the steps
   that fit), exported as a model file (``calcjax.model.export``) into OUT, and scored on the phantom
   test split (``report.md``, ``scores.csv`` into OUT).

``tests/test_device_run.py`` runs the staging on CPU with the smoke config. Nothing here is needed to
build or test calcjax.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PREFLIGHT = r"""
import json, jax, flax, optax, orbax.checkpoint as ocp, numpy as np
from flax import nnx
import calcjax.train.loop, calcjax.score.cohort, calcjax.model.checkpoint, calcjax.data.input_pipeline
from calcjax.model import network as M
from calcjax.train import step as ts
from configs import smoke
c = smoke.get_config()
m = M.new_model(M.ModelConfig.from_config(c.model), 0)
tx = ts.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10, weight_decay=1e-4, grad_clip=1.0)
g, s = ts.create_state(m, tx)
step = ts.make_train_step(g, tx, ts.LossConfig.from_config(c.loss))
x = np.zeros((2, 32, 32, 3), np.float32); y = np.zeros((2, 32, 32), np.int32)
s, out = step(s, x, y)
print(json.dumps({"preflight_loss": float(out["loss"])}))
"""

PIPELINE = r"""
import importlib, json, sys, time
from absl import flags
flags.FLAGS(sys.argv[:1])  # grain's multiprocessing reads absl flags
from calcjax.data import input_pipeline as ip
shards, config, workers, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
c = importlib.import_module(f"configs.{config}").get_config()
split = ip.ShardSplit.load(shards, "train")
it = iter(ip.train_dataset(split, batch_size=c.train.batch_size, aug=ip.AugmentConfig.from_config(c.data),
                           calcium_fraction=c.data.calcium_fraction, seed=0, worker_count=workers))
for _ in range(5):
    next(it)
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < seconds:
    next(it); n += 1
dt = time.perf_counter() - t0
print(json.dumps({"bench": "input_pipeline", "config": config, "batch": c.train.batch_size,
                  "crop": c.data.crop, "worker_count": workers, "batches_per_s": round(n / dt, 3),
                  "slices_per_s": round(n * c.train.batch_size / dt, 1)}))
"""


class Session:
    """Runs the steps against one deadline; writes figures and logs to ``out``."""

    def __init__(self, out: str, deadline_s: float):
        self.out = out
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.log = open(os.path.join(out, "session.log"), "a", buffering=1)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="15")  # a short log
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def figure(self, row: dict) -> None:
        row = {"t_s": round(time.monotonic() - self.t0, 1), **row}
        line = json.dumps(row)
        print(line, flush=True)
        with open(os.path.join(self.out, "session.jsonl"), "a") as f:
            f.write(line + "\n")

    def start(
        self, name: str, cmd: list[str], env: dict | None = None, to_file: str = ""
    ) -> subprocess.Popen:
        """Starts ``cmd``; its output is read by :meth:`finish`, or goes to ``to_file`` (a process left
        running in the background must not fill a pipe nobody reads)."""
        self.log.write(f"\n### {name} (t={time.monotonic() - self.t0:.0f}s): {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or self.env,
            stdout=open(to_file, "w") if to_file else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its grain / pool workers are killed with it
        )
        proc.log_path = to_file
        return proc

    def finish(self, name: str, proc: subprocess.Popen, timeout: float) -> tuple[int | None, list[str]]:
        """Streams the process's output to the log until it ends or ``timeout`` s pass (then kills it).
        Returns (exit code or None when killed, JSON lines it printed)."""
        import selectors

        end = time.monotonic() + max(min(timeout, self.left()), 1.0)  # never past the budget
        rows: list[dict] = []
        if proc.stdout is None:  # output went to a file: wait, then copy the file's tail to the log
            while proc.poll() is None and time.monotonic() < end:
                time.sleep(1.0)
            killed = proc.poll() is None
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            with open(proc.log_path) as f:
                self.log.write(f.read()[-20000:])
            rc = None if killed else proc.returncode
            self.log.write(f"### {name}: {'killed at its time limit' if killed else f'exit {rc}'}\n")
            return rc, rows
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        killed = False
        while True:
            if time.monotonic() > end:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                if not line:
                    break
                self.log.write(line)
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
        proc.wait()
        rc = None if killed else proc.returncode
        self.log.write(f"### {name}: {'killed at its time limit' if killed else f'exit {rc}'}\n")
        return rc, rows

    def call(self, name: str, cmd: list[str], timeout: float, env: dict | None = None):
        return self.finish(name, self.start(name, cmd, env), timeout)


def versions(session: Session) -> dict:
    code = (
        "import json, jax, flax, optax, orbax.checkpoint as o, grain, torch; "
        "print(json.dumps({'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__,"
        " 'orbax': o.__version__, 'torch': torch.__version__,"
        " 'devices': [d.device_kind for d in jax.devices()],"
        " 'torch_cuda': torch.cuda.is_available()}))"
    )
    rc, rows = session.call("versions", [sys.executable, "-c", code], 60)
    return rows[-1] if rows else {"error": f"versions: exit {rc}"}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget_s", type=float, default=780, help="wall time for every stage together")
    p.add_argument("--scans", type=int, default=80)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--config", default="default", choices=["default", "smoke"])
    p.add_argument("--size", type=int, default=512, help="phantom matrix and bench/gpu_step.py crop")
    p.add_argument("--autotune_level", default="0", help="XLA_FLAGS=--xla_gpu_autotune_level ('' = XLA's)")
    p.add_argument("--torch_variants", default="eager,channels_last,compile")
    p.add_argument("--pin_site", default="", help="site folder with the pinned flax / optax / orbax")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM)")
    p.add_argument("--peak_tflops_f32", type=float, default=67.0, help="f32 dense peak (H100/H200 SXM)")
    p.add_argument("--compile_s", type=float, default=300, help="time limit of the compile stage")
    p.add_argument("--gpu_step_s", type=float, default=170, help="time limit of bench/gpu_step.py")
    p.add_argument("--score_s", type=float, default=90, help="time limit of bench/score.py")
    p.add_argument(
        "--score_pipeline_s", type=float, default=180, help="time limit of bench/score.py --pipeline"
    )
    p.add_argument("--pipeline_scans", type=int, default=4, help="phantoms the pipelined scorer scores")
    p.add_argument(
        "--score_workers", type=int, default=2, help="the pipelined scorer's workers (2 over 1: host scaling)"
    )
    p.add_argument("--reserve_s", type=float, default=100, help="kept for export and scoring")
    p.add_argument("--work", default="", help="folder for phantoms, shards and the run (default: a new temp)")
    return p.parse_args()


def stage_machine(s: Session, args) -> bool:
    """1. The machine and a preflight; the pinned versions if the machine's own do not run calcjax."""
    s.figure({"bench": "machine", **versions(s)})
    rc, _ = s.call("preflight", [sys.executable, "-c", PREFLIGHT], 120)
    if rc != 0 and args.pin_site:
        s.env["PYTHONPATH"] = os.pathsep.join([args.pin_site, s.env["PYTHONPATH"]])
        rc, _ = s.call("preflight (pinned)", [sys.executable, "-c", PREFLIGHT], 120)
        s.figure({"bench": "machine", "pinned": True, **versions(s)})
    s.figure({"bench": "preflight", "ok": rc == 0})
    return rc == 0


def stage_compile(s: Session, args) -> None:
    """2. Cold and cached compilation of the config's train step (bench/compile.py)."""
    program = f"{args.config}_train_step"
    rc, rows = s.call("compile", [sys.executable, "bench/compile.py", "--programs", program], args.compile_s)
    for r in rows:
        s.figure({**r, "autotune_level": args.autotune_level})
    if not rows:
        s.figure({"bench": "compile", "program": program, "ok": False, "exit": rc,
                  "limit_s": args.compile_s, "autotune_level": args.autotune_level})  # fmt: skip


def start_data(s: Session, args, work: str) -> tuple[subprocess.Popen, str]:
    """Phantoms -> shards in the background (their output to a file)."""
    py, phantom, shards = sys.executable, os.path.join(work, "phantom"), os.path.join(work, "shards")
    cmd = (
        f"{py} -m data_prep.phantom --out {phantom} --scans {args.scans} --protocol mixed --seed 11 "
        f"--size {args.size} --workers {args.workers} && {py} -m data_prep.build --input {phantom} "
        f"--out {shards} --workers {args.workers} --split train=0.8,val=0.1,test=0.1 "
        "--salt calcjax-gpu-session-2026"
    )
    return s.start("data", ["bash", "-c", cmd], to_file=os.path.join(work, "data.log")), shards


def stage_step(s: Session, args, batch: int, dtype: str) -> float | None:
    """3. The train step, JAX and the PyTorch twin: bfloat16 with every variant, then float32 JAX alone.
    Returns JAX's seconds per step in the config's dtype."""
    step_env = dict(s.env, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # torch shares the GPU in that process
    step_s = None
    for dtypes, variants, share in (("bfloat16", args.torch_variants, 0.6), ("float32", "", 0.4)):
        extra = ["--torch_variants", variants] if variants else ["--no_torch"]
        rc, rows = s.call(
            f"gpu_step {dtypes}",
            [sys.executable, "bench/gpu_step.py", "--config", args.config, "--size", str(args.size),
             "--batch", str(batch), "--steps", "10", "--dtypes", dtypes, *extra,
             "--peak_tflops", str(args.peak_tflops), "--peak_tflops_f32", str(args.peak_tflops_f32)],
            share * args.gpu_step_s, env=step_env,
        )  # fmt: skip
        for r in rows:
            s.figure(r)
            if (
                r.get("framework") == "jax"
                and "seconds_per_step" in r
                and (step_s is None or dtypes == dtype)
            ):
                step_s = r["seconds_per_step"]
    return step_s


def stage_score(s: Session, args) -> None:
    """4. The scorer's throughput and forward share (bench/score.py, the shipped and the config's model)."""
    default_scans = "2" if args.config == "default" else "0"
    rc, rows = s.call(
        "bench_score",
        [sys.executable, "bench/score.py", "--scans", "2", "--default_scans", default_scans,
         "--size", str(args.size)],
        min(args.score_s, max(s.left() - args.reserve_s, 5)),
    )  # fmt: skip
    for r in rows:
        s.figure(r)


def stage_pipeline(s: Session, args, shards: str) -> float | None:
    """5. The input pipeline alone: batches/s."""
    cmd = [sys.executable, "-c", PIPELINE, shards, args.config, str(args.workers), "15"]
    rc, rows = s.call("pipeline", cmd, 60)
    bps = None
    for r in rows:
        s.figure(r)
        bps = r.get("batches_per_s")
    return bps


def stage_score_pipeline(s: Session, args, work: str) -> None:
    """6. The pipelined scorer against the serial one on the phantoms (``bench/score.py --pipeline``);
    training keeps at least two minutes."""
    cmd = [sys.executable, "bench/score.py", "--pipeline", "--dicom", os.path.join(work, "phantom"),
           "--limit", str(args.pipeline_scans), "--copies", "1", "--host_copies", "2",
           "--workers", str(args.score_workers)]  # fmt: skip
    rc, rows = s.call(
        "score_pipeline", cmd, min(args.score_pipeline_s, max(s.left() - args.reserve_s - 120, 5))
    )
    for r in rows:
        s.figure(r)
    if not rows:
        s.figure({"bench": "score_pipeline", "ok": False, "exit": rc})


def stage_train(s: Session, args, work: str, shards: str, rate: float) -> str | None:
    """7. Training for the time left at ``rate`` steps/s, exported into OUT; the model file or None.
    0.75 of the rate: the loop also moves and fingerprints each batch; a run cut at its limit still
    leaves the checkpoints written every quarter."""
    train_s = s.left() - args.reserve_s - 60  # compile, validation, checkpoint
    steps = max(20, int(train_s * rate * 0.75) // 20 * 20)
    run = os.path.join(work, "run")
    overrides = [
        f"--config.data.shards={shards}", f"--config.train.steps={steps}",
        f"--config.train.warmup_steps={max(2, min(1000, steps // 10))}",
        f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={max(1, steps // 4)}",
        f"--config.data.worker_count={args.workers}", "--config.train.log_every=10",
    ]  # fmt: skip
    s.figure(
        {"bench": "train_plan", "steps": steps, "rate_steps_per_s": round(rate, 3), "train_s": round(train_s)}
    )
    t0 = time.monotonic()
    rc, _ = s.call("train", [sys.executable, "-m", "calcjax.train", f"--config=configs/{args.config}.py",
                             f"--workdir={run}", *overrides], s.left() - args.reserve_s + 30)  # fmt: skip
    if os.path.exists(os.path.join(run, "metrics.jsonl")):
        shutil.copy(os.path.join(run, "metrics.jsonl"), os.path.join(args.out, "metrics.jsonl"))
    s.figure({"bench": "train", "ok": rc == 0, "steps": steps, "seconds": round(time.monotonic() - t0, 1)})
    model = os.path.join(args.out, f"calcjax-{args.config}-phantom-device.msgpack")
    rc, _ = s.call("export", [sys.executable, "-m", "calcjax.model.export", f"--checkpoint={run}",
                              "--which=latest", f"--out={model}"], 90)  # fmt: skip
    s.figure({"bench": "export", "ok": rc == 0})
    return model if rc == 0 else None


def stage_score_test_split(s: Session, args, work: str, shards: str, model: str) -> None:
    """The exported model on the phantom test split: report.md and scores.csv into OUT."""
    out, t0 = os.path.join(work, "score"), time.monotonic()
    rc, _ = s.call("score", [sys.executable, "-m", "calcjax.score", f"--shards={shards}/test-*.array_record",
                             f"--checkpoint={model}", f"--out={out}"], max(30, s.left() - 5))  # fmt: skip
    n = 0
    if os.path.exists(os.path.join(out, "scores.csv")):
        for name in ("report.md", "scores.csv"):
            if os.path.exists(os.path.join(out, name)):
                shutil.copy(os.path.join(out, name), os.path.join(args.out, name))
        with open(os.path.join(out, "scores.csv")) as f:
            n = sum(1 for _ in f) - 1
    s.figure({"bench": "score_test_split", "ok": rc == 0, "scans": n,
              "seconds_incl_compile": round(time.monotonic() - t0, 1)})  # fmt: skip


def main() -> None:
    args = _args()
    os.makedirs(args.out, exist_ok=True)
    s = Session(args.out, args.budget_s)
    if args.autotune_level != "":
        flag = f"--xla_gpu_autotune_level={args.autotune_level}"
        s.env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flag) if x)
    s.env["CALCJAX_COMPILE_CACHE"] = os.path.join(args.out, "xla_cache")
    import tempfile

    work = args.work or tempfile.mkdtemp(prefix="calcjax-device-run-")
    os.makedirs(work, exist_ok=True)
    if not stage_machine(s, args):
        return
    stage_compile(s, args)
    data, shards = start_data(s, args, work)
    t_data = time.monotonic()
    c = __import__(f"configs.{args.config}", fromlist=["get_config"]).get_config()
    step_s = stage_step(s, args, c.train.batch_size, c.model.dtype)
    stage_score(s, args)
    rc, _ = s.finish("data", data, s.left() - args.reserve_s - 60)
    s.figure({"bench": "data", "ok": rc == 0, "scans": args.scans, "size": args.size,
              "seconds": round(time.monotonic() - t_data, 1)})  # fmt: skip
    if rc != 0:
        return
    bps = stage_pipeline(s, args, shards)
    stage_score_pipeline(s, args, work)
    rate = min(1 / step_s if step_s else 1.0, bps or 1.0)  # 1 step/s when a rate is missing
    model = stage_train(s, args, work, shards, rate)
    if model is not None:
        stage_score_test_split(s, args, work, shards, model)


if __name__ == "__main__":
    main()
