r"""Batch scoring of a cohort with a trained checkpoint: ``python -m calcjax.score``.

  python -m calcjax.score --dicom DIR --out OUT      # the shipped model (calcjax/model/shipped/)
  python -m calcjax.score --nifti NIFTI_DIR --out OUT   # *.nii.gz CT volumes in HU (calcjax.io.nifti)
  python -m calcjax.score --shards 'SHARDS/test-*.array_record' --checkpoint RUN --out OUT
  python -m calcjax.score --dicom DIR --checkpoint RUN --out OUT [--labels LABELS] [--save_masks] \
      [--reference_scores SHEET.xlsx] [--dicom_seg --dicom_sr]

``--checkpoint`` is a training workdir (its ``best`` or ``latest`` checkpoint, ``--which``), one step
folder or a one-file model (``calcjax.model.files``, SHA-256 checked); without it, the shipped model
(``calcjax.model.files.DEFAULT_MODEL``). The model's config comes from the checkpoint. Scans stream one
at a time (memory is bounded by the largest scan, not the cohort): load -> jitted, batched forward
sharded over this process's devices (``calcjax.inference.predictor``) -> predicted labels, kept only inside
the heart's neighbourhood (``calcjax.inference.heart_region``; ``--noheart_region`` keeps them all) -> with
``--lesion_completion_mm2 A`` (default 0: off), each predicted lesion completed to its whole >= threshold
component up to A mm^2 (``calcjax.inference.lesion_completion``) -> ``calcjax.core.agatston``
(HU >= the calcium threshold inside the prediction) -> one row (``calcjax.score.rows``, whose
``heart_region`` says ``found``, ``not_found``: no lungs found, nothing removed, or ``off``).

Outputs in OUT:
- ``scores.jsonl``: one JSON line per scan, appended and flushed as each scan finishes
  (``calcjax.score.rows.score_row``);
- ``scores.csv``: the same rows flattened, rewritten at the end;
- ``errors.jsonl``: one line per scan or input that failed (input, stage, kind, reason); the run goes on.
  Inputs are named by scan id or salted file name, never by path, and reasons carry no header value and
  no path text (``calcjax.io.deid``);
- ``masks/<scan_id>.nii.gz`` with ``--save_masks``: predicted labels on the scan's grid (RAS affine);
- ``dicom/<scan_id>.seg.dcm`` with ``--dicom_seg`` and ``dicom/<scan_id>.sr.dcm`` with ``--dicom_sr``
  (DICOM route): a DICOM Segmentation of the predicted calcium and a TID 1500 measurement report
  (``calcjax.report.dicom_outputs``). These two carry the source's patient and study attributes, as PACS
  objects must; every other output stays free of them. Each row's ``dicom_outputs`` names the files written
  (``;``-separated; empty when they failed, with the reason in ``errors.jsonl``);
- where scans have reference labels: ``report.md`` and ``figures/`` (``calcjax.report.markdown``);
- ``salt.txt`` and ``inputs.private.tsv`` (DICOM route): the salt of the scan ids, reused on ``--resume``,
  and the map from each name in the outputs to its input path; keep both private (remove them before
  sharing the folder);
- ``run.json``: the model's SHA-256 and the scoring settings; ``--resume`` with another model or other
  settings is refused, so one folder never mixes two models' rows;
- ``.calcjax.lock``: one job per folder; a second job on the same ``--out`` is refused while the first
  runs (``calcjax.io.outputs.FolderLock``).

``--resume`` skips scans already in ``scores.jsonl`` (a line cut by a kill is dropped); without it a
non-empty OUT is refused. An OUT inside the searched ``--dicom`` folder is not searched. On several
hosts, process i scores every scan whose index is i modulo the process count into ``parts/``; after a
barrier process 0 merges the parts into ``scores.jsonl`` in scan order and writes the CSV and the report.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from calcjax.core import cli, compile_cache, sharding
from calcjax.data import scan_sources
from calcjax.inference import predictor as inference
from calcjax.io import deid, discover, labels, outputs, reference_scores
from calcjax.model import checkpoint
from calcjax.model import files as model_file
from calcjax.report import dicom_outputs
from calcjax.report import markdown as report
from calcjax.score import pipeline, stages
from calcjax.score import rows as score_rows
from calcjax.score.options import ScoreOptions

SCORES, ERRORS = outputs.SCORES, outputs.ERRORS


@dataclasses.dataclass
class Job:
    """One open scoring job: its options, model, scans and output files (this process's share)."""

    options: ScoreOptions
    predictor: inference.Predictor
    scans: list  # every scan of the cohort, in cohort order (scan_sources.ScanInput)
    todo: list  # this process's scans not yet scored
    skipped: int  # this process's scans already scored (resume)
    scores_path: str
    errors: outputs.ErrorLog
    model_sha256: str
    checkpoint_label: str
    sheet: object = None  # reference_scores.read_reference_scores, when a sheet is given
    sheet_base: str | None = None
    readers: object = None  # the shard readers to close (shard route)


def score_cohort(options: ScoreOptions, predictor: inference.Predictor | None = None) -> dict:
    """Scores every scan of ``options``' input into ``options.out`` (module docstring): :func:`open_job`,
    :func:`score_scan` for each scan, :func:`finish`.

    ``predictor``: an already compiled :class:`calcjax.inference.predictor.Predictor` of this checkpoint, to
    score several cohorts without recompiling (default: built from the checkpoint).

    Returns a summary dict: scans scored now, skipped (already scored), failed, seconds, scans/min,
    slices/s, the forward pass's share of the time, and the report path (or None). Raises
    ``outputs.FolderBusyError`` when another job holds ``out`` and ``outputs.RunRecordError`` when
    ``resume`` would mix another model or other settings into it.
    """
    os.makedirs(options.out, exist_ok=True)
    # Process 0 holds the folder for the whole job (the other processes of a multi-host job write their
    # own part files under it); the kernel drops the lock when the process ends, however it ends.
    pid = jax.process_index()
    lock = outputs.FolderLock(options.out, "calcjax.score").acquire() if pid == 0 else None
    try:
        job = open_job(options, predictor)
        try:
            counts = _score_all(job)
        finally:
            if job.readers is not None:
                job.readers.close()
        return finish(job, counts)
    finally:
        if lock is not None:
            lock.release()


def _part_paths(out: str) -> tuple[str, str]:
    """(scores, errors) JSON-lines paths of this process: the folder's own, or its part files when
    several processes score one cohort."""
    pid, pcount = jax.process_index(), jax.process_count()
    if pcount == 1:
        return os.path.join(out, SCORES), os.path.join(out, ERRORS)
    part_dir = os.path.join(out, "parts")
    os.makedirs(part_dir, exist_ok=True)
    return tuple(os.path.join(part_dir, f"{k}-{pid:05d}-of-{pcount:05d}.jsonl") for k in ("scores", "errors"))


def open_job(options: ScoreOptions, predictor: inference.Predictor | None) -> Job:
    """Checks the folder (resume, run record), loads the model and the reference sheet, lists the scans
    and records the inputs that could not be used."""
    o = options
    scores_path, errors_path = _part_paths(o.out)
    if not o.resume and (outputs.read_jsonl(scores_path) or outputs.read_jsonl(errors_path)):
        raise FileExistsError(
            f"{o.out} already holds scores: pass --resume to go on, or choose another --out"
        )
    sheet = sheet_base = None
    if o.reference_scores_path is not None:
        sheet = reference_scores.read_reference_scores(o.reference_scores_path, o.reference_key_column)
        sheet_base = reference_scores.match_base(o.reference_scores_path, o.dicom_dir or o.nifti_dir or ".")
    label = _checkpoint_name(o.checkpoint_path, o.which)  # before loading: a run may move on
    model_sha256 = checkpoint.content_sha256(o.checkpoint_path, o.which)
    if jax.process_index() == 0:
        if not o.resume and os.path.isfile(os.path.join(o.out, "run.json")):
            os.remove(os.path.join(o.out, "run.json"))  # nothing was scored into it: this run starts afresh
        fix = "resume with the same --checkpoint and settings, or choose another --out"
        outputs.check_run_record(o.out, "run", o.run_record(model_sha256), fix=fix)
    if predictor is None:
        predictor = inference.Predictor.from_checkpoint(
            o.checkpoint_path, o.which, batch_size=o.batch_size, min_calcium_probability=o.calcium_probability
        )
    elif (given := getattr(predictor, "min_calcium_probability", 0.5)) != o.calcium_probability:
        raise ValueError(
            f"the predictor given calls calcium above {given}, the options say {o.calcium_probability}"
        )
    scans, readers, listing_errors = _list_scans(o, context=(predictor.in_channels - 1) // 2)
    errors = outputs.ErrorLog(errors_path)
    if jax.process_index() == 0:
        for e in listing_errors:
            errors.record(e)
    if not scans:
        raise discover.no_scans_error(o.dicom_dir or o.nifti_dir, listing_errors)
    pid, pcount = jax.process_index(), jax.process_count()
    mine = [s for i, s in enumerate(scans) if i % pcount == pid]
    done = {r["scan_id"] for r in outputs.read_jsonl(scores_path, repair=True)}
    todo = [s for s in mine if s.scan_id not in done]
    return Job(o, predictor, scans, todo, len(mine) - len(todo), scores_path, errors, model_sha256, label,
               sheet, sheet_base, readers)  # fmt: skip


def _list_scans(o: ScoreOptions, context: int) -> tuple[list, object, list[dict]]:
    """(scans, shard readers or None, error entries of inputs that could not be listed) of the input."""
    if o.shards is not None:
        scans, readers = scan_sources.shard_scans(o.shards, context=context)
        return scans, readers, []
    given = deid.read_salt_file(o.salt_file) if o.salt_file else None
    salt = sharding.broadcast_text(lambda: deid.load_salt(o.out, given, given_from=o.salt_file or ""))
    private_map: dict[str, str] = {}
    if o.nifti_dir is not None:
        scans, errors = scan_sources.nifti_scans(
            o.nifti_dir, salt=salt, exclude=(o.out,), private_map=private_map
        )
    else:
        scans, errors = scan_sources.dicom_scans(
            o.dicom_dir, context=context, salt=salt, labels_dir=o.labels_dir, exclude=(o.out,),
            private_map=private_map,
        )  # fmt: skip
    if jax.process_index() == 0:
        deid.update_private_map(o.out, private_map)
    return scans, None, errors


def _score_all(job: Job) -> dict:
    """Scores ``job.todo`` (a failed scan is recorded and skipped), one stage after another or pipelined
    (``options.workers``); the counts."""
    counts = dict(
        scored=0, failed=0, slices=0, t_start=time.perf_counter(), forward0=job.predictor.forward_seconds
    )
    show = job.options.progress and jax.process_index() == 0
    with tqdm(total=len(job.todo), desc="score", unit="scan", disable=not show) as bar:
        for _, row in _rows(job):
            bar.update(1)
            if row is None:
                counts["failed"] += 1
                continue
            outputs.append_jsonl(job.scores_path, row)
            counts["scored"] += 1
            counts["slices"] += row["num_slices"]
            elapsed = time.perf_counter() - counts["t_start"]
            bar.set_postfix(scans_per_s=f"{counts['scored'] / elapsed:.2f}", failed=counts["failed"])
    return counts


def _rows(job: Job):
    """``(scan, row or None)`` of ``job.todo`` in order: serial, or ``calcjax.score.pipeline``."""
    o = job.options
    if o.workers == 0:
        return ((scan, score_scan(job, scan)) for scan in job.todo)
    return pipeline.scored(
        job.todo,
        (o.use_heart_region, o.kvp_specific_threshold),
        lambda scan, prepared: forward(job, scan, prepared),
        lambda scan, prepared, raw, t0: finish_scan(job, scan, prepared, raw, t0),
        o.workers,
    )


def score_scan(job: Job, scan) -> dict | None:
    """One scan's score row (its masks, overlays and DICOM outputs written on the way), or None when it
    failed (recorded in ``errors.jsonl``): ``calcjax.score.stages``' three stages in a row."""
    o, t0 = job.options, time.perf_counter()
    prepared = stages.prepare(scan, o.use_heart_region, o.kvp_specific_threshold)
    raw = forward(job, scan, prepared)
    return None if raw is None else finish_scan(job, scan, prepared, raw, t0)


def forward(job: Job, scan, prepared) -> np.ndarray | None:
    """The forward pass's labels of a prepared scan (in its heart boxes with ``forward_in_heart_box``, for a
    model on native pixels), or None when it failed or could not be prepared (recorded)."""
    if isinstance(prepared, stages.Failed):
        _record_failure(job, scan, prepared.line)
        return None
    p, hu, spacing = job.predictor, prepared.loaded.hu, prepared.loaded.grid.spacing
    boxes = None
    if job.options.forward_in_heart_box and p.pixel_mm == 0:  # boxes lie on the scan's own pixels
        boxes = stages.heart_boxes(prepared.region, p.batch_size, p.multiple)
    try:
        return p.predict(hu, spacing) if boxes is None else p.predict_in_boxes(hu, boxes)
    except Exception as e:  # a cohort run records each bad scan and goes on
        _record_failure(job, scan, score_rows.error_line(scan, e))
        return None


def finish_scan(job: Job, scan, prepared: stages.Prepared, raw: np.ndarray, t0: float) -> dict | None:
    """The row of a scan whose forward pass gave ``raw`` (its files written), or None (recorded);
    ``seconds`` counts from ``t0``, when the scan was started."""
    o, loaded = job.options, prepared.loaded
    try:
        pred, region_status = stages.final_labels(prepared, raw, o.lesion_completion_mm2)
        row = score_rows.score_row(scan, loaded, pred, _reference_score(job, scan), **o.score_kw)
        row["heart_region"] = region_status
    except Exception as e:  # a cohort run records each bad scan and goes on
        _record_failure(job, scan, score_rows.error_line(scan, e))
        return None
    _write_scan_files(job, scan, loaded, pred, row)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _record_failure(job: Job, scan, line: dict) -> None:
    logging.warning("scan %s failed: %s", scan.scan_id, line["reason"])
    job.errors.record(line)


def _reference_score(job: Job, scan):
    """The sheet's reference score of ``scan`` (None without a sheet or a matching row)."""
    if job.sheet is None:
        return None
    return reference_scores.match(
        job.sheet, scan_id=scan.scan_id, scan_folder=scan.folder, base=job.sheet_base,
        key_suffix=job.options.reference_key_suffix,
    )  # fmt: skip


def _write_scan_files(job: Job, scan, loaded, pred: np.ndarray, row: dict) -> None:
    """The scan's DICOM SEG / SR, NIfTI mask and disagreement crops, as asked; ``row`` notes them."""
    o = job.options
    if o.dicom_seg or o.dicom_sr:
        try:
            row["dicom_outputs"] = ";".join(dicom_outputs.write_scan_outputs(
                o.out, scan.scan_id, loaded.source_files, pred, row, seg=o.dicom_seg, sr=o.dicom_sr,
                model_sha256=job.model_sha256,
            ))  # fmt: skip
        except Exception as e:  # the scores stand; the SEG / SR failure is recorded
            line = {**score_rows.error_line(scan, e), "stage": "dicom_outputs"}
            logging.warning("scan %s: no DICOM outputs: %s", scan.scan_id, line["reason"])
            job.errors.record(line)
            row["dicom_outputs"] = ""
    if o.save_masks:
        mask_dir = os.path.join(o.out, "masks")
        os.makedirs(mask_dir, exist_ok=True)
        labels.write_label_nifti(os.path.join(mask_dir, f"{scan.scan_id}.nii.gz"), pred, loaded.grid)
    if loaded.labels is not None:
        crops = score_rows.disagreement_crops(loaded, pred, row["threshold_hu"])
        row["disagreements"] = [{k: c[k] for k in ("kind", "voxels", "slice")} for c in crops]
        if crops:
            overlay_dir = os.path.join(o.out, "overlays")
            os.makedirs(overlay_dir, exist_ok=True)
            tmp = os.path.join(overlay_dir, f"{scan.scan_id}.tmp.npz")
            arrays = {f"{i}_{k}": c[k] for i, c in enumerate(crops) for k in ("hu", "pred", "ref")}
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, os.path.join(overlay_dir, f"{scan.scan_id}.npz"))


def finish(job: Job, counts: dict) -> dict:
    """Merges the processes' parts, writes the CSV and the report (process 0); the job's summary."""
    elapsed = time.perf_counter() - counts["t_start"]
    rate = (lambda n: n / elapsed) if elapsed > 0 else (lambda n: 0.0)
    summary = {
        "scored": counts["scored"],
        "skipped_already_scored": job.skipped,
        "failed": counts["failed"],
        "seconds": round(elapsed, 2),
        "scans_per_min": 60 * rate(counts["scored"]),
        "slices_per_s": rate(counts["slices"]),
        "forward_fraction": rate(job.predictor.forward_seconds - counts["forward0"]),
        "devices": job.predictor.mesh.size,
        "report": None,
    }
    out, order = job.options.out, {s.scan_id: i for i, s in enumerate(job.scans)}
    if jax.process_count() > 1:
        sharding.barrier("calcjax.score:parts")
        if jax.process_index() == 0:
            outputs.merge_parts(out, os.path.join(out, "parts"), order, jax.process_count())
    if jax.process_index() != 0:
        return {**summary, "total_scores": None}
    rows = outputs.read_jsonl(os.path.join(out, SCORES))
    rows.sort(key=lambda r: order.get(r["scan_id"], len(order)))
    outputs.write_csv(os.path.join(out, outputs.SCORES_CSV), rows)
    if job.sheet is not None:
        summary.update(_sheet_matches(job.sheet, rows))
    if any("reference_agatston" in r for r in rows):
        summary["report"] = report.write_report(
            out, rows, checkpoint=job.checkpoint_label, num_bootstrap=job.options.num_bootstrap
        )
    return {**summary, "total_scores": len(rows)}


def _sheet_matches(sheet, rows: list[dict]) -> dict:
    """How many of the sheet's rows matched a scored scan (a warning names the unmatched count)."""
    matched = sum(r.get("reference_source") == "sheet" for r in rows)
    if matched < len(sheet):
        logging.warning(
            "%d of %d reference-score rows matched no scored scan (check the key column, "
            "--reference_key_suffix and that the sheet lies in or beside the scanned folder)",
            len(sheet) - matched, len(sheet),
        )  # fmt: skip
    return {"sheet_rows": len(sheet), "sheet_rows_matched": matched}


def _checkpoint_name(path: str | None, which: str) -> str:
    """``<run folder>/<best|checkpoints>/<step>`` of the checkpoint used, or a model file's name and
    SHA-256 (for the report)."""
    if path is None or os.path.isfile(path):
        path = path or model_file.DEFAULT_MODEL
        return f"{os.path.basename(path)} (sha256 {model_file.sha256_of(path)})"
    folder = checkpoint.resolve(path, which)
    return os.sep.join(folder.rstrip(os.sep).split(os.sep)[-3:])


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so modules import side by side)."""
    flags.DEFINE_string("shards", None, "Glob of shard files, e.g. 'SHARDS/test-*.array_record'.")
    flags.DEFINE_string("dicom", None, "Folder searched for CT series (every series is scored).")
    flags.DEFINE_string("nifti", None, "Folder searched for *.nii.gz CT volumes in HU (every one is scored).")
    flags.DEFINE_string("labels", None, "DICOM route: a mirrored tree of reference labels.")
    flags.DEFINE_string("salt_file", None, "DICOM route: scan-id salt (e.g. SHARDS/salt.txt).")
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Training workdir, checkpoint step folder or model file (.msgpack); default: the shipped model.",
    )
    flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint of a workdir to use.")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_bool("resume", False, "Skip scans already in OUT/scores.jsonl.")
    flags.DEFINE_bool("save_masks", False, "Write OUT/masks/<scan_id>.nii.gz.")
    flags.DEFINE_integer("batch_size", 0, "Slices per forward pass (0: 4 per local device).")
    flags.DEFINE_bool(
        "forward_in_heart_box", False,
        "Run the network only on the heart region's boxes (calcjax.score.stages.heart_boxes): faster; labels "
        "inside the region may differ where the box cuts the network's context.",
    )  # fmt: skip
    flags.DEFINE_float(
        "calcium_probability", 0.5,
        "A voxel is calcium where the model's calcium probability (1 - P(background)) exceeds this.",
    )  # fmt: skip
    flags.DEFINE_integer(
        "workers", 0,
        "Processes reading and preparing the next scans while the forward pass runs (0: one stage after "
        "another in this process; the rows are the same).",
    )  # fmt: skip
    flags.DEFINE_float("mass_calibration", None, "mg per (HU x mm^3); mass is reported when given.")
    flags.DEFINE_bool("kvp_specific_threshold", False, "Calcium threshold from the scan's kVp.")
    flags.DEFINE_bool(
        "heart_region",
        True,
        "Keep predicted calcium only in the heart's neighbourhood (calcjax.inference.heart_region).",
    )
    flags.DEFINE_float(
        "lesion_completion_mm2",
        0.0,
        "Complete each predicted lesion to its whole >= threshold component up to this in-plane area "
        "(mm^2; calcjax.inference.lesion_completion). 0: off (the default, chosen on phantoms: "
        "docs/experiments/).",
    )
    flags.DEFINE_bool("dicom_seg", False, "DICOM route: write OUT/dicom/<scan_id>.seg.dcm (DICOM SEG).")
    flags.DEFINE_bool("dicom_sr", False, "DICOM route: write OUT/dicom/<scan_id>.sr.dcm (TID 1500 SR).")
    flags.DEFINE_integer("num_bootstrap", 1000, "Bootstrap resamples for the report's CIs.")
    flags.DEFINE_string(
        "reference_scores", None, "CSV or .xlsx of scan-level reference Agatston (one row per scan)."
    )
    flags.DEFINE_string("reference_key_column", None, "Key column of --reference_scores (default: auto).")
    flags.DEFINE_string(
        "reference_key_suffix", "",
        "Sheet key = scan folder name + this suffix (default: the name, else the name and one letter: '2A').",
    )  # fmt: skip


def main(argv):
    del argv
    if flags.FLAGS.out is None:
        raise app.UsageError("--out is required")
    try:
        options = options_from_flags(flags.FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    logging.set_verbosity(logging.WARNING)
    compile_cache.enable()
    sharding.initialize_distributed()
    user_errors = (
        model_file.ModelFileError,
        checkpoint.CheckpointError,
        discover.NoScansError,
        reference_scores.ReferenceScoresError,
        outputs.FolderBusyError,
        outputs.RunRecordError,
        deid.SaltError,
        pipeline.WorkerDiedError,
    )
    summary = cli.run_or_exit("calcjax.score", lambda: score_cohort(options), user_errors)
    if jax.process_index() == 0:
        print(
            f"scored {summary['scored']} scans ({summary['skipped_already_scored']} already scored, "
            f"{summary['failed']} failed: see {os.path.join(options.out, ERRORS)}) "
            f"in {summary['seconds']} s, "
            f"{summary['scans_per_min']:.1f} scans/min, {summary['slices_per_s']:.1f} slices/s "
            f"on {summary['devices']} device(s); {summary['total_scores']} rows in "
            f"{os.path.join(options.out, SCORES)}"
        )
        if summary["report"]:
            print(f"report: {summary['report']}")


def options_from_flags(f) -> ScoreOptions:
    """The :class:`ScoreOptions` of the command line (``ValueError`` for a combination it refuses)."""
    return ScoreOptions(
        out=f.out, checkpoint_path=f.checkpoint, shards=f.shards, dicom_dir=f.dicom, nifti_dir=f.nifti,
        labels_dir=f.labels, salt_file=f.salt_file, which=f.which, resume=f.resume, save_masks=f.save_masks,
        batch_size=f.batch_size, mass_calibration=f.mass_calibration,
        kvp_specific_threshold=f.kvp_specific_threshold, use_heart_region=f.heart_region,
        lesion_completion_mm2=f.lesion_completion_mm2, dicom_seg=f.dicom_seg, dicom_sr=f.dicom_sr,
        num_bootstrap=f.num_bootstrap, reference_scores_path=f.reference_scores,
        reference_key_column=f.reference_key_column, reference_key_suffix=f.reference_key_suffix,
        workers=f.workers, forward_in_heart_box=f.forward_in_heart_box,
        calcium_probability=f.calcium_probability,
    )  # fmt: skip


def run() -> None:
    """The console command ``calcjax-score``."""
    cli.run_command("calcjax-score", "calcjax.score", __doc__, main, define_flags)


if __name__ == "__main__":
    run()
