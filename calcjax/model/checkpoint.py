"""Orbax checkpoint folders as the scorer reads them: their layout, sealing and verification, and
``load_for_inference``. A trainer writes them through ``calcjax.train.checkpoint``.

``WORKDIR/checkpoints/<step>/`` (``max_to_keep`` latest, saved asynchronously) holds the items ``params``,
``batch_stats``, ``opt_state``, ``counters`` (step, skipped steps), ``data`` (the grain iterator's position,
through ``grain.checkpoint``) and ``config`` (the resolved config, JSON), and ``ema_params`` /
``ema_batch_stats`` for a run that keeps moving averages (``train.ema_decay``). ``WORKDIR/best/<step>/``
holds ``params``, ``batch_stats``, ``config`` and ``metrics`` of the best validation voxel F1 so far: the
weights validation measured (``calcjax.train.step.inference_weights``: the moving averages when the run
keeps them).
A step folder is scored with its ``ema_*`` items when it has them, else with ``params`` / ``batch_stats``.
Restores go against abstract targets (``ocp.utils.to_shape_dtype_struct``), so optax states come back as
their own types. ``load_for_inference`` needs nothing but a checkpoint folder: the model config is read
from the checkpoint itself.

Every finished step folder gets a ``sha256.txt`` (:func:`folder_sha256` of its files) once Orbax has
finalised it (before the next save, and at ``wait`` / ``close``); loading for inference and resuming verify
it and refuse a folder whose bytes changed since (a flipped byte in a parameter chunk). A step folder
without one (a run killed before sealing its last save, or written by an older calcjax) still loads;
its parameters are checked for finiteness in any case.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings

import jax
import orbax.checkpoint as ocp
from flax import nnx

from calcjax.io.atomic import write_atomic
from calcjax.model import files as model_file
from calcjax.model import network as model_lib

STATE_ITEMS = ("params", "batch_stats", "opt_state", "counters")
EMA_ITEMS = ("ema_params", "ema_batch_stats")


def holds_averages(folder: str) -> bool:
    """Whether a step folder holds a run's moving averages (``EMA_ITEMS``, ``train.ema_decay``)."""
    return all(os.path.isdir(os.path.join(folder, item)) for item in EMA_ITEMS)


class CheckpointError(ValueError):
    """A checkpoint that must not be used, naming the folder and the reason."""


BEST_METRIC = "val_voxel_f1"
CHECKSUM_FILE = "sha256.txt"


def folder_sha256(folder: str) -> str:
    """SHA-256 over a checkpoint step folder: every file's relative path and bytes, in sorted order
    (``sha256.txt`` and a temporary of it left out)."""
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if dirpath == folder and name.startswith(CHECKSUM_FILE):
                continue
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
    return h.hexdigest()


def seal_finished(root: str) -> None:
    """Writes ``sha256.txt`` into every finished step folder under ``root`` that has none (Orbax's
    unfinished folders carry a temporary suffix, not a bare step number)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        if (
            name.isdigit()
            and os.path.isdir(folder)
            and not os.path.isfile(os.path.join(folder, CHECKSUM_FILE))
        ):
            write_atomic(os.path.join(folder, CHECKSUM_FILE), folder_sha256(folder) + "\n")


def verify(folder: str) -> str:
    """The folder's SHA-256; CheckpointError when it differs from the ``sha256.txt`` kept in it."""
    digest = folder_sha256(folder)
    path = os.path.join(folder, CHECKSUM_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            kept = f.read().strip()
        if kept != digest:
            raise CheckpointError(
                f"{folder}: its files no longer match the sha256.txt written when it was saved "
                f"({digest[:12]}... now, {kept[:12]}... then): the checkpoint is damaged"
            )
    return digest


def resolve(path: str, which: str = "best") -> str:
    """A checkpoint step folder from a workdir (``which`` = best / latest) or from a step folder itself."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        return path
    sub = {"best": "best", "latest": "checkpoints"}[which]
    root = os.path.join(path, sub)
    steps = (
        sorted((int(d) for d in os.listdir(root) if d.isdigit()), reverse=True) if os.path.isdir(root) else []
    )
    if not steps:
        if which == "best":
            return resolve(path, "latest")
        raise FileNotFoundError(f"no checkpoint under {path} (looked for best/<step> and checkpoints/<step>)")
    return os.path.join(root, str(steps[0]))


# Words only the echoes of a failed Orbax / TensorStore read carry.
_FAILED_READ_MARKS = ("Encountered error while reading array index", "in OCDBT database", "TensorStore(")
_noise_filters_installed = False


def _is_failed_read_noise(exc: BaseException | None, text: str = "") -> bool:
    """Whether an exception reported after the fact is the echo of a failed checkpoint read: Orbax's
    sibling read coroutines and futures (a TensorStore / OCDBT read error, anywhere in the exception's
    chain) or TensorStore callbacks that find Orbax's event loop already closed."""
    texts = [text]
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return True
        texts.append(str(exc))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return any(mark in t for t in texts for mark in _FAILED_READ_MARKS)


def _drop_failed_read_noise() -> None:
    """Keeps a damaged checkpoint's error to one line. When one array of an Orbax / TensorStore restore
    fails, the restore raises at once, but its sibling reads go on failing in other threads and Python
    reports each when it is collected or completes ("Exception ignored in <coroutine ...>" and "Event loop
    is closed" through ``sys.unraisablehook``, "exception was never retrieved" through the ``asyncio``
    logger, "coroutine ... was never awaited" as a warning at exit), before and after the raised error,
    each with a full TensorStore spec. They say nothing the raised error does not. Installed once per
    process before the first restore, these filters drop only reports of that kind; every other report
    goes to the hook, handlers and warning filters there were before."""
    global _noise_filters_installed
    if _noise_filters_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_failed_read_noise(unraisable.exc_value):
            previous(unraisable)

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            return not _is_failed_read_noise(exc, record.getMessage())

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_Filter())
    # Sibling reads that never started are collected at exit as "coroutine ... was never awaited".
    warnings.filterwarnings(
        "ignore",
        message="coroutine '_read_array_index_and_device_put' was never awaited",
        category=RuntimeWarning,
    )
    _noise_filters_installed = True


def _short(e: Exception) -> str:
    """An Orbax / TensorStore error in one short line (their messages append a full spec dump)."""
    text = (str(e).split(" See full TensorStore details")[0].splitlines() or [""])[0]
    return f"{e.__class__.__name__}: {text[:200]}"


def load_for_inference(path: str | None, which: str = "best"):
    """(config dict, eval-mode model) from a workdir, a step folder or a one-file model
    (``calcjax.model.files``, digest checked); ``None`` is the shipped model. The config is the checkpoint's
    own; a step folder's weights are its moving averages (``ema_params`` / ``ema_batch_stats``) when it holds
    them, else ``params`` / ``batch_stats``."""
    if path is None:
        path = model_file.DEFAULT_MODEL
    if os.path.isfile(path):
        config, model, _ = model_file.load(path)
        return config, model
    folder = resolve(path, which)
    verify(folder)
    try:  # the JSON item as Orbax's public API reads it (not its file layout)
        config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(folder, "config"))
    except Exception as e:  # Orbax raises several types for a missing or damaged item
        raise CheckpointError(
            f"{folder}: no readable config in the checkpoint ({e.__class__.__name__})"
        ) from None
    mcfg = model_lib.ModelConfig.from_saved(config["model"])
    graphdef, params, batch_stats = nnx.split(model_lib.abstract_model(mcfg), nnx.Param, nnx.BatchStat)
    ckptr = ocp.StandardCheckpointer()
    _drop_failed_read_noise()
    names = EMA_ITEMS if holds_averages(folder) else ("params", "batch_stats")
    try:
        params = ckptr.restore(os.path.join(folder, names[0]), _restore_target(params))
        batch_stats = ckptr.restore(os.path.join(folder, names[1]), _restore_target(batch_stats))
    except Exception as e:  # Orbax / TensorStore raise many types for damaged or missing files
        raise CheckpointError(f"{folder}: cannot be read as a calcjax checkpoint ({_short(e)})") from None
    for name, tree in zip(names, (params, batch_stats), strict=True):
        bad = model_file.count_non_finite(tree)
        if bad:
            raise CheckpointError(
                f"{folder}: {bad} non-finite values in {name}: the checkpoint is damaged (a flipped byte "
                "or a diverged run); it would score every scan as no calcium"
            )
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    return config, model


def _restore_target(frame: nnx.State) -> nnx.State:
    """``frame`` (``jax.ShapeDtypeStruct`` leaves) as Orbax's restore target: every array on this
    process's first device, as the scorer uses them."""
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), frame)


def content_sha256(path: str | None, which: str = "best") -> str:
    """The SHA-256 of the model a scorer would load from ``path`` (a model file's bytes, or a step
    folder's :func:`folder_sha256`); ``None`` is the shipped model."""
    path = path or model_file.DEFAULT_MODEL
    if os.path.isfile(path):
        return model_file.sha256_of(path)
    return folder_sha256(resolve(path, which))
