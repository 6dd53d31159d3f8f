"""``python -m calcjax.model.export --checkpoint RUN[,RUN...] --out NAME.msgpack``: one training run's model,
or the :class:`calcjax.model.network.Ensemble` of several, as one model file (``calcjax.model.files``)."""

from __future__ import annotations

import os

from calcjax.model import checkpoint
from calcjax.model import network as model_lib
from calcjax.model.files import ModelFileError, ensemble_config, save


def export(checkpoints: list[str], which: str, out: str) -> str:
    """Writes the model of one checkpoint (a training workdir, a step folder or a model file), or the
    :class:`calcjax.model.network.Ensemble` of several, to ``out``; returns the digest."""
    loaded = [checkpoint.load_for_inference(c, which) for c in checkpoints]
    if any("ensemble" in c for c, _ in loaded):
        raise ModelFileError("an ensemble's members must be single models, not ensembles")
    if len(loaded) == 1:
        return save(out, *loaded[0])
    config = ensemble_config([c for c, _ in loaded])
    return save(out, config, model_lib.Ensemble([m for _, m in loaded]))


def main(argv):  # pragma: no cover - run by hand: it exported the shipped model
    from absl import flags

    del argv
    digest = export(flags.FLAGS.checkpoint.split(","), flags.FLAGS.which, flags.FLAGS.out)
    size = os.path.getsize(flags.FLAGS.out)
    print(f"wrote {flags.FLAGS.out} ({size / 1e6:.2f} MB, sha256 {digest})")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string(
        "checkpoint",
        None,
        "Training workdir or checkpoint step folder; several, comma-separated: an ensemble.",
        required=True,
    )
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of a workdir to export.")
    flags.DEFINE_string("out", None, "Model file to write (NAME.msgpack).", required=True)
    app.run(main)
