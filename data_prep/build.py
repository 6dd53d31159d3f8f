r"""Builds ArrayRecord shards of 2.5D stacks from folders of DICOM CT (+ NIfTI / COCA XML labels).

  python -m data_prep.build --input DIR --out SHARDS [--split train=0.8,val=0.1,test=0.1] [--context 1] \
      [--split_by series|patient] [--workers W] [--labels LABEL_TREE] [--label_format auto|nifti|xml] \
      [--protocol chest|cardiac] [--records_per_shard 512] [--salt S] [--reslice_mm 5]

Output: ``{split}-{i:05d}-of-{n:05d}.array_record``, ``manifest.json``
(schema version, settings, per-scan metadata with record ranges, indices of records with calcium), TFDS's
``dataset_info.json`` and ``features.json`` (the folder is a TFDS dataset: ``calcjax.io.shards``) and
``errors.jsonl`` (every skipped input and the reason; a series that was built but whose files made pydicom
warn gets one ``reader_warnings`` line with ``"severity": "warning"``). Scans are named by a salted hash;
the salt lives in ``SHARDS/salt.txt`` (created on the first build and reused so reruns keep their ids; a
build into a new folder with ``--salt`` of the same value gives added scans the same ids), and
``SHARDS/inputs.private.tsv`` maps every name the outputs use (scan ids, ``file-...`` names) back to its
input path: keep both private, and remove them before sharing the shards. ``SHARDS/build.json`` records
the settings and an input fingerprint: a rerun after a kill finishes the job (finished shards are kept,
unfinished ones rebuilt, and the same inputs give the same shards); a rerun with other inputs or settings
is refused. A second build on the same folder is refused while the first runs. Errors that stop the whole
build (nothing found, folder busy, a full or read-only disk) are one line on stderr with exit status 2.
``--reslice_mm T`` writes every scan as contiguous T mm slices (``calcjax.io.reslice``: a thin gated scan
and its labels as the thick reconstruction a chest protocol reads).
"""

from __future__ import annotations

import os

from absl import flags

from calcjax.core import cli
from calcjax.io import deid, outputs
from calcjax.io.discover import NoScansError
from data_prep.builder import BuildOptions, build

_INPUT = flags.DEFINE_string("input", None, "Folder tree holding DICOM series (and labels).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output shard folder.", required=True)
_SPLIT = flags.DEFINE_string("split", "train=0.8,val=0.1,test=0.1", "Split ratios by scan.")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Seed of the split assignment.")
_SPLIT_BY = flags.DEFINE_enum(
    "split_by", "series", ["series", "patient"],
    "Draw the split per series, or per patient (the COCA release's patient folder, else PatientID).",
)  # fmt: skip
_CONTEXT = flags.DEFINE_integer("context", 1, "k: each record holds C = 2k+1 adjacent slices.", lower_bound=0)
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes writing shards.", lower_bound=1)
_LABELS = flags.DEFINE_string("labels", None, "Optional label tree mirroring the input's folders.")
_LABEL_FORMAT = flags.DEFINE_enum("label_format", "auto", ["auto", "nifti", "xml"], "Preferred label format.")
_PROTOCOL = flags.DEFINE_enum(
    "protocol", None, ["chest", "cardiac", "unknown"], "Override the protocol guess."
)
_RECORDS_PER_SHARD = flags.DEFINE_integer(
    "records_per_shard", 512, "Target records per shard.", lower_bound=1
)
_SALT = flags.DEFINE_string(
    "salt", None, "Salt of the scan-id hash (default: SHARDS/salt.txt, created once)."
)

_RESLICE_MM = flags.DEFINE_float(
    "reslice_mm", 0.0, "Write every scan as contiguous slices this thick, mm (0: as it is).", lower_bound=0.0
)


def main(argv):
    del argv
    m = cli.run_or_exit(
        "data_prep.build",
        _build_from_flags,
        (NoScansError, outputs.FolderBusyError, outputs.RunRecordError, deid.SaltError),
    )
    per_split = ", ".join(f"{k}: {v['num_records']} records" for k, v in sorted(m["splits"].items()))
    print(
        f"built {m['num_scans']} scans, {m['num_records']} slices ({per_split}); "
        f"skipped {m['num_errors']} inputs, {m['num_warnings']} series with reader warnings "
        f"(see errors.jsonl); {m['seconds']:.1f} s "
        f"-> {os.path.abspath(_OUT.value)}"
    )


def _build_from_flags() -> dict:
    return build(
        BuildOptions(
            _INPUT.value,
            _OUT.value,
            split=_SPLIT.value,
            split_seed=_SPLIT_SEED.value,
            split_by=_SPLIT_BY.value,
            context=_CONTEXT.value,
            workers=_WORKERS.value,
            labels_dir=_LABELS.value,
            label_format=_LABEL_FORMAT.value,
            protocol=_PROTOCOL.value,
            records_per_shard=_RECORDS_PER_SHARD.value,
            salt=_SALT.value,
            reslice_mm=_RESLICE_MM.value,
        )
    )


def run() -> None:
    """The console command ``calcjax-build``."""
    cli.run_command("calcjax-build", "data_prep.build", __doc__, main)


if __name__ == "__main__":
    run()
