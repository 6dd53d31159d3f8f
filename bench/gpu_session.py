"""The GPU work of one device session, in one command that fits the session's 15 minutes of device time.

  python bench/gpu_session.py --out OUT [--deadline_s 480] [--scans 80] [--workers 12] \
      [--pin_site DIR] [--config default] [--size 512]

Each figure is one JSON line on stdout and in ``OUT/session.jsonl``; everything the steps print goes to
``OUT/session.log``. In order, each step bounded by what is left of ``--deadline_s``:

1. ``machine``: the device, jax / flax / optax / orbax / torch versions; a preflight (imports, a tiny
   jitted train step). If it fails with the machine's own packages and ``--pin_site`` holds the versions
   calcjax is developed with (flax, optax, orbax-checkpoint wheels), those go first on the path.
2. Phantoms -> shards (``data_prep.phantom`` and ``data_prep.build``, ``--workers`` processes) in the
   background while ``bench/gpu_step.py`` times the config's train step at ``--size`` (batch of the
   config, bfloat16 then float32; JAX and the PyTorch twin: eager, channels-last, ``torch.compile``).
3. ``input_pipeline``: the grain training stream alone at the config's batch and crop (batches/s).
4. ``calcjax.train`` with the config for as many steps as the time left allows at the slower of the
   measured step and pipeline rates (warm-up and cosine decay over those steps, validation at the end);
   its ``metrics.jsonl`` and the exported model (``calcjax.model.files``) go to OUT.
5. ``calcjax.score`` with that model over the test split (phantom test figures, ``report.md`` and
   ``scores.csv`` to OUT, and the wall time per scan), then ``bench/score.py`` (scorer throughput).

Nothing here is needed to build or test calcjax; it is how the GPU figures in the README were made.
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
m = M.DenseRAUnet(M.ModelConfig.from_config(c.model), rngs=nnx.Rngs(0))
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

        end = time.monotonic() + max(timeout, 1.0)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--deadline_s", type=float, default=480)
    p.add_argument("--scans", type=int, default=80)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--config", default="default", choices=["default", "smoke"])
    p.add_argument("--size", type=int, default=512, help="phantom matrix and bench/gpu_step.py crop")
    p.add_argument("--pin_site", default="", help="site folder with the pinned flax / optax / orbax")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM)")
    p.add_argument("--peak_tflops_f32", type=float, default=67.0, help="f32 dense peak (H100/H200 SXM)")
    p.add_argument("--gpu_step_s", type=float, default=170, help="time limit of bench/gpu_step.py")
    p.add_argument("--reserve_s", type=float, default=100, help="kept for export and scoring")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    s = Session(args.out, args.deadline_s)
    import tempfile

    work = tempfile.mkdtemp(prefix="calcjax-gpu-session-")
    py = sys.executable

    # 1. The machine and a preflight; the pinned versions if the machine's own do not run calcjax.
    s.figure({"bench": "machine", **versions(s)})
    rc, rows = s.call("preflight", [py, "-c", PREFLIGHT], 120)
    if rc != 0 and args.pin_site:
        s.env["PYTHONPATH"] = os.pathsep.join([args.pin_site, s.env["PYTHONPATH"]])
        rc, rows = s.call("preflight (pinned)", [py, "-c", PREFLIGHT], 120)
        s.figure({"bench": "machine", "pinned": True, **versions(s)})
    s.figure({"bench": "preflight", "ok": rc == 0})
    if rc != 0:
        return

    # 2. Data in the background; the step benchmark in the foreground.
    phantom, shards = os.path.join(work, "phantom"), os.path.join(work, "shards")
    data_cmd = (
        f"{py} -m data_prep.phantom --out {phantom} --scans {args.scans} --protocol mixed --seed 11 "
        f"--size {args.size} --workers {args.workers} && {py} -m data_prep.build --input {phantom} "
        f"--out {shards} --workers {args.workers} --split train=0.8,val=0.1,test=0.1 "
        "--salt calcjax-gpu-session-2026"
    )
    t_data = time.monotonic()
    data = s.start("data", ["bash", "-c", data_cmd], to_file=os.path.join(work, "data.log"))
    c = __import__(f"configs.{args.config}", fromlist=["get_config"]).get_config()
    batch = c.train.batch_size
    step_env = dict(s.env, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # torch shares the GPU in that process
    step_s = None
    # bfloat16 (the config's dtype) with every PyTorch variant first; float32 without torch.compile.
    for dtypes, variants, share in (
        ("bfloat16", "eager,channels_last,compile", 0.6),
        ("float32", "eager", 0.4),
    ):
        rc, rows = s.call(
            f"gpu_step {dtypes}",
            [py, "bench/gpu_step.py", "--config", args.config, "--size", str(args.size),
             "--batch", str(batch), "--steps", "10", "--dtypes", dtypes, "--torch_variants", variants,
             "--peak_tflops", str(args.peak_tflops), "--peak_tflops_f32", str(args.peak_tflops_f32)],
            share * args.gpu_step_s,
            env=step_env,
        )  # fmt: skip
        for r in rows:
            s.figure(r)
            if (
                r.get("framework") == "jax"
                and "seconds_per_step" in r
                and (step_s is None or dtypes == c.model.dtype)
            ):
                step_s = r["seconds_per_step"]
    rc, _ = s.finish("data", data, s.left() - args.reserve_s - 60)
    s.figure({"bench": "data", "ok": rc == 0, "scans": args.scans, "size": args.size,
              "seconds": round(time.monotonic() - t_data, 1)})  # fmt: skip
    if rc != 0:
        return

    # 3. The input pipeline alone.
    rc, rows = s.call("pipeline", [py, "-c", PIPELINE, shards, args.config, str(args.workers), "15"], 60)
    pipe_bps = None
    for r in rows:
        s.figure(r)
        pipe_bps = r.get("batches_per_s")

    # 4. Training for the time left at the slower of the two rates.
    # 0.75: the loop also moves and fingerprints each batch; a run cut at its time limit still leaves the
    # checkpoints written every quarter.
    rate = min(1 / step_s if step_s else 1.0, pipe_bps or 1.0)  # 1 step/s when a rate is missing
    train_s = s.left() - args.reserve_s - 60  # compile, validation, checkpoint
    steps = max(100, int(train_s * rate * 0.75) // 20 * 20)
    run = os.path.join(work, "run")
    overrides = [
        f"--config.data.shards={shards}", f"--config.train.steps={steps}",
        f"--config.train.warmup_steps={max(10, min(1000, steps // 10))}",
        f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps // 4}",
        f"--config.data.worker_count={args.workers}", "--config.train.log_every=50",
    ]  # fmt: skip
    s.figure(
        {"bench": "train_plan", "steps": steps, "rate_steps_per_s": round(rate, 3), "train_s": round(train_s)}
    )
    t_train = time.monotonic()
    rc, _ = s.call(
        "train",
        [py, "-m", "calcjax.train", f"--config=configs/{args.config}.py", f"--workdir={run}", *overrides],
        s.left() - args.reserve_s + 30,
    )
    metrics = os.path.join(run, "metrics.jsonl")
    if os.path.exists(metrics):
        shutil.copy(metrics, os.path.join(args.out, "metrics.jsonl"))
    s.figure(
        {"bench": "train", "ok": rc == 0, "steps": steps, "seconds": round(time.monotonic() - t_train, 1)}
    )

    # 5. Export, score the test split, scorer throughput.
    model = os.path.join(args.out, f"calcjax-{args.config}-phantom-gpu.msgpack")
    rc, _ = s.call(
        "export",
        [py, "-m", "calcjax.model.files", f"--checkpoint={run}", "--which=latest", f"--out={model}"],
        60,
    )
    s.figure({"bench": "export", "ok": rc == 0})
    if rc == 0:
        score_out = os.path.join(work, "score")
        t_score = time.monotonic()
        rc, _ = s.call(
            "score",
            [py, "-m", "calcjax.score", f"--shards={shards}/test-*.array_record", f"--checkpoint={model}",
             f"--out={score_out}"],
            max(30, s.left() - 40),
        )  # fmt: skip
        n = 0
        if os.path.exists(os.path.join(score_out, "scores.csv")):
            for name in ("report.md", "scores.csv"):
                shutil.copy(os.path.join(score_out, name), os.path.join(args.out, name))
            with open(os.path.join(score_out, "scores.csv")) as f:
                n = sum(1 for _ in f) - 1
        s.figure({"bench": "score_test_split", "ok": rc == 0, "scans": n,
                  "seconds_incl_compile": round(time.monotonic() - t_score, 1)})  # fmt: skip
    if s.left() > 30:
        rc, rows = s.call(
            "bench_score",
            [py, "bench/score.py", "--scans", "2", "--default_scans", "2", "--size", str(args.size)],
            s.left() - 5,
        )
        for r in rows:
            s.figure(r)


if __name__ == "__main__":
    main()
