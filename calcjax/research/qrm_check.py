r"""A model on a real scanner's known answer: its figures on the QRM calcification insert
(``calcjax.inference.qrm_figures`` says what each means).

  python -m calcjax.research.qrm_check DICOM_DIR [--checkpoint RUN|MODEL]   # one JSON line

(without --checkpoint: the shipped model).

A folder without the insert, a bad series or checkpoint: one stderr line naming it, exit status 2.
"""

from __future__ import annotations

import argparse
import json

from calcjax.data import qrm
from calcjax.inference.qrm_figures import QrmReference, evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m calcjax.research.qrm_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dicom_dir", help="folder of the QRM calcification insert's series")
    parser.add_argument(
        "--checkpoint", default=None, help="workdir, step folder or model file (default: the shipped model)"
    )
    parser.add_argument("--which", default="best", help="a workdir's checkpoint: best or latest")
    args = parser.parse_args(argv)
    from calcjax.core import cli
    from calcjax.inference import predictor as inference
    from calcjax.io import dicom
    from calcjax.model import checkpoint
    from calcjax.model import files as model_file

    def job() -> dict:
        ref = QrmReference.load(args.dicom_dir)
        return evaluate(inference.Predictor.from_checkpoint(args.checkpoint, args.which), ref)

    errors = (
        dicom.DicomError,
        qrm.InsertNotFoundError,
        checkpoint.CheckpointError,
        model_file.ModelFileError,
    )
    out = cli.run_or_exit("calcjax.research.qrm_check", job, errors)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
