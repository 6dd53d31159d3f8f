r"""One-file models for scoring: saving, loading (checked) and the shipped model.

A model file (``NAME.msgpack``) is flax's msgpack of ``{"format", "config" (the training config as JSON
text), "params", "batch_stats"}`` (float32 arrays, pure dicts of ``nnx.State``); beside it,
``NAME.msgpack.sha256`` holds the SHA-256 of the file's bytes. :func:`load` recomputes it and refuses a
file whose digest differs (a damaged download or a flipped byte gives an error, never a silently wrong
model), and refuses non-finite parameters.

An ensemble (``calcjax.model.network.Ensemble``: K members of one architecture, the mean of their class
probabilities) is one file too: its config is the first member's training config with ``"ensemble":
{"members": K, "member_configs": [each member's training config]}``, and its ``params`` /
``batch_stats`` are the ensemble's (``{"members": {0: ..., K-1: ...}}``). :func:`load` gives back an
``Ensemble`` for such a file, a ``DenseRAUnet`` otherwise.

The shipped model lives in the package (``calcjax/model/shipped/``, model card
``calcjax/model/shipped/README.md``) so an installed calcjax finds it: :data:`DEFAULT_MODEL`.
``calcjax.score`` uses it when ``--checkpoint`` is not given. ``python -m calcjax.model.export`` writes a
training run (or several, as an ensemble) to one file.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from flax import nnx, serialization, traverse_util

from calcjax.io.atomic import write_atomic
from calcjax.model import network as model_lib

FORMAT = "calcjax-model-v1"
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")
DEFAULT_MODEL = os.path.join(MODELS_DIR, "calcjax-smoke-phantom-v3-rand.msgpack")


class ModelFileError(ValueError):
    """A model file that cannot be used, naming the file and the reason."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def count_non_finite(tree) -> int:
    """How many values of a pytree of arrays (parameters, batch statistics) are NaN or infinite."""
    return sum(int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def ensemble_config(configs: list[dict]) -> dict:
    """The config of an ensemble model file whose members were trained with ``configs`` (one each, one
    architecture): the first member's, plus ``"ensemble"`` (module docstring)."""
    models = [model_lib.ModelConfig.from_saved(c["model"]) for c in configs]
    if any(m != models[0] for m in models[1:]):
        raise ModelFileError("ensemble members must share one architecture (config.model)")
    return {**configs[0], "ensemble": {"members": len(configs), "member_configs": list(configs)}}


def save(path: str, config: dict, model: nnx.Module) -> str:
    """Writes ``model``'s parameters and batch statistics with ``config`` to ``path`` (+ ``.sha256``);
    returns the digest. An :class:`calcjax.model.network.Ensemble` needs :func:`ensemble_config`'s config."""
    members = config.get("ensemble", {}).get("members")
    if isinstance(model, model_lib.Ensemble) != (members is not None) or (
        members is not None and members != len(model.members)
    ):
        raise ModelFileError(f"{path}: the config's ensemble block does not describe the model to save")
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    payload = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "params": jax.tree.map(np.asarray, params.to_pure_dict()),
        "batch_stats": jax.tree.map(np.asarray, batch_stats.to_pure_dict()),
    }
    write_atomic(path, serialization.msgpack_serialize(payload))
    digest = sha256_of(path)
    write_atomic(path + ".sha256", f"{digest}  {os.path.basename(path)}\n".encode())
    return digest


def expected_sha256(path: str) -> str:
    side = path + ".sha256"
    if not os.path.isfile(side):
        raise ModelFileError(f"{path}: no {os.path.basename(side)} beside it; cannot check the file")
    with open(side) as f:
        return f.read().split()[0].strip().lower()


def load(path: str):
    """``(config dict, eval-mode DenseRAUnet, sha256)`` of a model file, after checking its digest and
    that every parameter is finite. Raises :class:`ModelFileError` naming the file and the reason."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such model file")
    want, got = expected_sha256(path), sha256_of(path)
    if want != got:
        raise ModelFileError(
            f"{path}: SHA-256 {got[:16]}... does not match {want[:16]}... in its .sha256 file: the file is "
            "damaged or was replaced; restore it (git checkout / reinstall) or export it again"
        )
    with open(path, "rb") as f:
        try:
            payload = serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several types on malformed data
            raise ModelFileError(f"{path}: not a calcjax model file ({e.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a {FORMAT} file")
    config = json.loads(payload["config"])
    graphdef, params, batch_stats = nnx.split(_empty_model(config), nnx.Param, nnx.BatchStat)
    for name, frame in (("params", params), ("batch_stats", batch_stats)):
        _put_in(frame, payload.get(name), path, name)
    for name, tree in (("params", params), ("batch_stats", batch_stats)):
        bad = count_non_finite(tree)
        if bad:
            raise ModelFileError(f"{path}: {bad} non-finite values in {name}")
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    return config, model, got


def _empty_model(config: dict) -> nnx.Module:
    """The model a saved config describes (a DenseRAUnet, or an Ensemble of them) with shapes only, its
    weights to be put in (``network.abstract_model``: nothing drawn or computed)."""
    mcfg = model_lib.ModelConfig.from_saved(config["model"])
    return model_lib.abstract_model(mcfg, config.get("ensemble", {}).get("members"))


def _put_in(frame: nnx.State, saved, path: str, name: str) -> None:
    """Puts the saved arrays ``saved`` (a pure dict) into ``frame`` (shapes only) in place, after checking
    that they are exactly the arrays the model needs, each with its shape; raises :class:`ModelFileError`
    naming the file and the first array that does not fit."""
    want = {_key(k): v.shape for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(frame)).items()}
    got = traverse_util.flatten_dict(saved) if isinstance(saved, dict) else {}
    got = {_key(k): v for k, v in got.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise ModelFileError(
            f"{path}: {name} lacks {len(missing)} arrays the model its config describes needs "
            f"(e.g. {missing[0]})"
        )
    if extra:
        raise ModelFileError(
            f"{path}: {name} holds {len(extra)} arrays the model its config describes has not "
            f"(e.g. {extra[0]})"
        )
    for k, shape in want.items():
        if tuple(np.shape(got[k])) != tuple(shape):
            raise ModelFileError(
                f"{path}: {name} {k} has shape {tuple(np.shape(got[k]))}; the model its config describes "
                f"needs {tuple(shape)}"
            )
    nnx.replace_by_pure_dict(frame, saved)


def _key(parts: tuple) -> str:
    """A flattened pure-dict key as one path text (``encoder/0/layers/1/conv/kernel``)."""
    return "/".join(str(p) for p in parts)
