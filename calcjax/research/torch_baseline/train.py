r"""The PyTorch baseline trainer: the same run as ``calcjax.train``, in PyTorch, for reproducibility studies.

  python -m calcjax.research.torch_baseline.train --config configs/smoke.py --workdir RUN_TORCH \
      --config.data.shards=SHARDS [--config.train.steps=...]

Same as the JAX trainer, by construction: the initial weights (a JAX DenseRAUnet initialised with
``train.seed``, converted), the batches (the same grain pipeline, seed and augmentation), the loss (the
bootstrap-IoU twin), the optimizer (AdamW with optax's defaults b1 0.9, b2 0.999, eps 1e-8, decoupled
weight decay on every parameter), the learning rate at every update (optax's warm-up + cosine schedule
itself, evaluated at the update count), the global-norm clipping rule (optax's: scale by clip / norm when
the norm is >= clip), BatchNorm running variances from the biased batch variance (Flax's rule; PyTorch's
own is unbiased, rescaled after each forward pass), and the skipping of non-finite steps (BatchNorm
statistics restored, the update count not advanced). Validation runs whole val scans in eval mode
through the PyTorch model.

Writes ``WORKDIR/metrics.jsonl`` with the JAX trainer's keys, ``WORKDIR/config.json``,
``WORKDIR/torch/last.pt`` and ``WORKDIR/torch/best.pt`` (state_dicts), and both also as calcjax
checkpoints (converted; ``WORKDIR/best/<step>`` and a params-only ``WORKDIR/checkpoints/<step>``), so
``calcjax.score --checkpoint WORKDIR [--which latest]`` scores the PyTorch-trained model. Single process,
CPU or one CUDA GPU (``--device``).
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import optax
import torch
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from calcjax.core import config as config_schema
from calcjax.core import metrics
from calcjax.data import input_pipeline
from calcjax.data import sources as sources_lib
from calcjax.io import preprocess
from calcjax.model import network as model_lib
from calcjax.research.torch_baseline import convert
from calcjax.research.torch_baseline import losses as torch_losses
from calcjax.research.torch_baseline import model as torch_model
from calcjax.train import checkpoint as train_checkpoint
from calcjax.train import config as train_config
from calcjax.train import evaluation
from calcjax.train import step as ts


def initial_models(config: ml_collections.ConfigDict, seed: int):
    """(JAX model, PyTorch twin with the same initial weights)."""
    mcfg = model_lib.ModelConfig.from_config(config.model)
    jax_model = model_lib.new_model(mcfg, seed)  # the JAX trainer's initial weights
    twin = torch_model.DenseRAUnet(mcfg)
    twin.load_state_dict(convert.jax_to_torch(jax_model))
    return jax_model, twin


class TorchTrainer:
    """One optimisation step at a time, matching ``calcjax.train.step.train_step`` (module docstring)."""

    def __init__(self, model: torch.nn.Module, config: ml_collections.ConfigDict, device: str = "cpu"):
        t = config.train
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.loss_cfg = ts.LossConfig.from_config(config.loss)
        self.schedule = optax.warmup_cosine_decay_schedule(
            0.0,
            t.learning_rate,
            warmup_steps=max(t.warmup_steps, 1),
            decay_steps=max(t.steps, t.warmup_steps + 1),
        )
        self.grad_clip = float(t.grad_clip)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay
        )
        # Flax updates BatchNorm's running variance with the biased batch variance, PyTorch with the
        # unbiased one: record each BatchNorm's sample count n so step() can rescale PyTorch's update.
        self._bn_count: dict[str, int] = {}
        for name, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.register_forward_pre_hook(self._count_hook(name))
        self.updates = 0  # optax's count: advanced by finite steps only
        self.skipped = 0
        self.bad_in_a_row = 0

    def _count_hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0]
            self._bn_count[name] = x.numel() // x.shape[1]

        return hook

    def _biased_running_var(self, old: dict[str, torch.Tensor]) -> None:
        """new = (1-m) old + m var_unbiased  ->  (1-m) old + m var_unbiased (n-1)/n (Flax's rule)."""
        with torch.no_grad():
            for name, mod in self.model.named_modules():
                if isinstance(mod, torch.nn.BatchNorm2d) and name in self._bn_count:
                    n, m = self._bn_count[name], mod.momentum
                    prev = old[f"{name}.running_var" if name else "running_var"]
                    batch_unbiased = (mod.running_var - (1 - m) * prev) / m
                    mod.running_var.copy_((1 - m) * prev + m * batch_unbiased * (n - 1) / n)

    def step(self, images: np.ndarray, labels: np.ndarray) -> dict:
        """``images`` ``(B, H, W, C)`` HU, ``labels`` ``(B, H, W)`` -> loss, grad_norm, finite, counts."""
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, 1), dtype=np.float32)).to(
            self.device
        )
        y = torch.from_numpy(np.asarray(labels, np.int64)).to(self.device)
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = torch_losses.bootstrap_iou_loss(logits, y, **self.loss_cfg.kwargs())
        loss.backward()
        self._biased_running_var(buffers)  # after backward: autograd checks the buffers' versions
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        finite = bool(np.isfinite(loss.item()) and np.isfinite(norm))
        if finite:
            if norm >= self.grad_clip:  # optax.clip_by_global_norm
                for g in grads:
                    g.mul_(self.grad_clip / norm)
            lr = float(self.schedule(self.updates))
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            self.updates += 1
            self.bad_in_a_row = 0
        else:
            with torch.no_grad():
                for k, v in self.model.named_buffers():
                    v.copy_(buffers[k])
            self.skipped += 1
            self.bad_in_a_row += 1
        with torch.no_grad():
            pred = labels_from_logits(logits) > 0
            ref = y > 0
            counts = {
                "tp": int((pred & ref).sum()),
                "fp": int((pred & ~ref).sum()),
                "fn": int((~pred & ref).sum()),
            }
        return {"loss": float(loss.item()), "grad_norm": norm, "finite": finite, **counts}


def labels_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``calcjax.model.network.labels_from_logits`` for NCHW logits: labels ``(B, H, W)`` uint8."""
    p_background = torch.softmax(logits.float(), dim=1)[:, 0]
    artery = torch.argmax(logits[:, 1:], dim=1) + 1
    return torch.where(p_background < 0.5, artery, torch.zeros_like(artery)).to(torch.uint8)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: input_pipeline.ShardSplit,
    batch_size: int,
    device,
    loss_cfg: ts.LossConfig,
    max_scans: int = 0,
) -> dict:
    """Validation figures of the PyTorch model over the labelled scans of ``split`` (the first
    ``max_scans``; 0 = all), in eval mode."""
    model.eval()
    summaries, loss_sum, num_slices = [], 0.0, 0
    for item in input_pipeline.iter_scans(split):
        if item["labels"] is None:
            continue
        if max_scans and len(summaries) >= max_scans:
            break
        preds = []
        for start in range(0, len(item["hu"]), batch_size):
            stacks = preprocess.slice_stacks(item["hu"], split.context, start, start + batch_size)
            chunk = np.moveaxis(stacks, -1, 1).astype(np.float32)
            logits = model(torch.from_numpy(chunk).to(device))
            preds.append(labels_from_logits(logits).cpu().numpy())
            lab = torch.from_numpy(np.asarray(item["labels"][start : start + batch_size], np.int64)).to(
                device
            )
            for i in range(len(lab)):  # each slice's own loss with rho = 1, as calcjax.train.evaluation
                loss_sum += float(
                    torch_losses.bootstrap_iou_loss(
                        logits[i : i + 1], lab[i : i + 1], **loss_cfg.kwargs(rho=1.0, k_min=1)
                    )
                )
            num_slices += len(lab)
        scan = item["scan"]
        summaries.append(
            metrics.summarize_scan(
                scan.scan_id, scan.protocol, np.concatenate(preds), item["labels"], item["hu"], scan.spacing
            )
        )
    model.train()
    if not summaries:
        return {}
    return evaluation.validation_figures(summaries, loss_sum, num_slices)


def _jax_state(twin: torch.nn.Module, config: ml_collections.ConfigDict, step: int):
    mcfg = model_lib.ModelConfig.from_config(config.model)
    jax_model = model_lib.abstract_model(mcfg)  # every weight comes from the twin
    convert.torch_to_jax({k: v.cpu() for k, v in twin.state_dict().items()}, jax_model)
    _, state = ts.create_state(jax_model, optax.identity())
    return state.replace(step=np.int32(step))


def _save_best_as_calcjax(
    workdir: str, twin: torch.nn.Module, config: ml_collections.ConfigDict, step: int, values: dict
) -> None:
    """The PyTorch weights as a calcjax best checkpoint (``WORKDIR/best/<step>``) for ``calcjax.score``."""
    ckpt = train_checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save_best(
        _jax_state(twin, config, step), json.loads(config.to_json_best_effort()), {**values, "step": step}
    )
    ckpt.close()


def _save_last_as_calcjax(workdir: str, twin: torch.nn.Module, config: ml_collections.ConfigDict, step: int):
    """The final PyTorch weights as a params-only calcjax checkpoint (``WORKDIR/checkpoints/<step>``), so
    ``calcjax.score --which latest`` and ``calcjax.research.compare --which latest`` score them."""
    train_checkpoint.save_for_inference(
        os.path.join(workdir, "checkpoints"),
        _jax_state(twin, config, step),
        json.loads(config.to_json_best_effort()),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, device: str = "cpu") -> dict:
    """Trains the PyTorch twin per ``config`` (checked as the JAX trainer checks it) in ``workdir``; returns
    the last metrics."""
    train_config.check_config(config)
    if config.train.init_from:
        raise config_schema.ConfigError("train.init_from (fine-tuning) is not supported by the PyTorch twin")
    if config.train.ema_decay:
        raise config_schema.ConfigError(
            "train.ema_decay (weight averaging) is not supported by the PyTorch twin"
        )
    if config.data.real_val_shards:
        raise config_schema.ConfigError("data.real_val_shards is not supported by the PyTorch twin")
    if config.data.qrm_val_dicom:
        raise config_schema.ConfigError("data.qrm_val_dicom is not supported by the PyTorch twin")
    if config.model.pixel_mm:
        raise config_schema.ConfigError(
            "model.pixel_mm (resampled input) is not supported by the PyTorch twin"
        )
    os.makedirs(os.path.join(workdir, "torch"), exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    t, d = config.train, config.data
    _, twin = initial_models(config, t.seed)
    trainer = TorchTrainer(twin, config, device)
    sources = sources_lib.parse_sources(d.sources, d.shards)
    data = input_pipeline.train_dataset(
        sources_lib.training_splits(sources),
        batch_size=t.batch_size,
        aug=input_pipeline.AugmentConfig.from_config(d),
        calcium_fraction=d.calcium_fraction,
        seed=d.seed,
        worker_count=d.worker_count,
    )
    try:
        val_split = input_pipeline.ShardSplit.load(sources[0].folder, "val")
    except ValueError:
        val_split = None
    it = iter(data)
    path = os.path.join(workdir, "metrics.jsonl")
    acc = evaluation.TrainMetrics()
    last, best = {}, None
    with open(path, "a") as log, tqdm(total=t.steps, desc="train (torch)", unit="step") as bar:
        for step in range(t.steps):
            batch = next(it)
            m = trainer.step(batch["images"], batch["labels"])
            if not m["finite"]:
                log.write(json.dumps({"step": step + 1, "skipped_step": True, "loss": m["loss"]}) + "\n")
                if trainer.bad_in_a_row >= t.max_bad_steps:
                    raise RuntimeError(f"{t.max_bad_steps} non-finite steps in a row (last at step {step})")
            else:
                acc.add(m["loss"], m["tp"], m["fp"], m["fn"])
            bar.update()
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                last = acc.line(trainer.skipped)
                log.write(json.dumps({"step": done, **last}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['train_loss']:.4f}", steps_s=f"{last['steps_per_s']:.2f}")
            if val_split is not None and (done % t.eval_every == 0 or done == t.steps):
                max_scans = 0 if done == t.steps else t.get("eval_max_scans", 0)
                val = evaluate(
                    trainer.model, val_split, t.batch_size, trainer.device, trainer.loss_cfg, max_scans
                )
                if val:
                    log.write(json.dumps({"step": done, **val}) + "\n")
                    log.flush()
                    last.update(val)
                    if best is None or val["val_voxel_f1"] > best:
                        best = val["val_voxel_f1"]
                        torch.save(twin.state_dict(), os.path.join(workdir, "torch", "best.pt"))
                        _save_best_as_calcjax(workdir, twin, config, done, val)
    torch.save(
        {"model": twin.state_dict(), "optimizer": trainer.opt.state_dict(), "updates": trainer.updates},
        os.path.join(workdir, "torch", "last.pt"),
    )
    _save_last_as_calcjax(workdir, twin, config, t.steps)
    return last


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so modules import side by side)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run folder.")
    flags.DEFINE_string("device", "cpu", "torch device: cpu or cuda.")


def main(argv):
    del argv
    if flags.FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.device)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
