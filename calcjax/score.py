r"""Batch scoring of a cohort with a trained checkpoint: ``python -m calcjax.score``.

  python -m calcjax.score --dicom DIR --out OUT      # the shipped model (calcjax/models/)
  python -m calcjax.score --shards 'SHARDS/test-*.array_record' --checkpoint RUN --out OUT
  python -m calcjax.score --dicom DIR --checkpoint RUN --out OUT [--labels LABELS] [--save_masks] \
      [--reference_scores SHEET.xlsx --reference_key_suffix A] [--dicom_seg --dicom_sr]

``--checkpoint`` is a training workdir (its ``best`` or ``latest`` checkpoint, ``--which``), one step
folder or a one-file model (``calcjax.model_file``, SHA-256 checked); without it, the shipped model
(``calcjax.model_file.DEFAULT_MODEL``). The model's config comes from the checkpoint. Scans stream one
at a time (memory is bounded by the largest scan, not the cohort): load -> jitted, batched forward
sharded over this process's devices (``calcjax.inference``) -> predicted labels, kept only inside the
heart's neighbourhood (``calcjax.heart_region``; ``--noheart_region`` keeps them all) -> with
``--lesion_completion_mm2 A`` (default 0: off), each predicted lesion completed to its whole >= threshold
component up to A mm^2 (``calcjax.lesion_completion``) -> ``calcjax.agatston``
(HU >= the calcium threshold inside the prediction) -> one row (``calcjax.score_rows``, whose
``heart_region`` says ``found``, ``not_found``: no lungs found, nothing removed, or ``off``).

Outputs in OUT:
- ``scores.jsonl``: one JSON line per scan, appended and flushed as each scan finishes
  (``calcjax.score_rows.score_row``);
- ``scores.csv``: the same rows flattened, rewritten at the end;
- ``errors.jsonl``: one line per scan or input that failed (input, stage, kind, reason); the run goes on.
  Inputs are named by scan id or salted file name, never by path, and reasons carry no header value and
  no path text (``calcjax.io.deid``);
- ``masks/<scan_id>.nii.gz`` with ``--save_masks``: predicted labels on the scan's grid (RAS affine);
- ``dicom/<scan_id>.seg.dcm`` with ``--dicom_seg`` and ``dicom/<scan_id>.sr.dcm`` with ``--dicom_sr``
  (DICOM route): a DICOM Segmentation of the predicted calcium and a TID 1500 measurement report
  (``calcjax.dicom_outputs``). These two carry the source's patient and study attributes, as PACS objects
  must; every other output stays free of them. Each row's ``dicom_outputs`` names the files written
  (``;``-separated; empty when they failed, with the reason in ``errors.jsonl``);
- where scans have reference labels: ``report.md`` and ``figures/`` (``calcjax.report``);
- ``salt.txt`` and ``inputs.private.tsv`` (DICOM route): the salt of the scan ids, reused on ``--resume``,
  and the map from each name in the outputs to its input path; keep both private (remove them before
  sharing the folder);
- ``run.json``: the model's SHA-256 and the scoring settings; ``--resume`` with another model or other
  settings is refused, so one folder never mixes two models' rows;
- ``.calcjax.lock``: one job per folder; a second job on the same ``--out`` is refused while the first
  runs (``calcjax.outputs.FolderLock``).

``--resume`` skips scans already in ``scores.jsonl`` (a line cut by a kill is dropped); without it a
non-empty OUT is refused. An OUT inside the searched ``--dicom`` folder is not searched. On several
hosts, process i scores every scan whose index is i modulo the process count into ``parts/``; after a
barrier process 0 merges the parts into ``scores.jsonl`` in scan order and writes the CSV and the report.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from calcjax import (
    agatston,
    checkpoint,
    cli,
    dicom_outputs,
    heart_region,
    inference,
    lesion_completion,
    model_file,
    outputs,
    report,
    scan_sources,
    score_rows,
    sharding,
)
from calcjax.io import deid, discover, labels, reference_scores

SCORES, ERRORS = outputs.SCORES, outputs.ERRORS


def score_cohort(
    *,
    checkpoint_path: str | None,
    out: str,
    shards: str | None = None,
    dicom_dir: str | None = None,
    labels_dir: str | None = None,
    salt_file: str | None = None,
    which: str = "best",
    resume: bool = False,
    save_masks: bool = False,
    batch_size: int = 0,
    mass_calibration: float | None = None,
    kvp_specific_threshold: bool = False,
    use_heart_region: bool = True,
    lesion_completion_mm2: float = 0.0,
    dicom_seg: bool = False,
    dicom_sr: bool = False,
    num_bootstrap: int = 1000,
    progress: bool = True,
    predictor: inference.Predictor | None = None,
    reference_scores_path: str | None = None,
    reference_key_column: str | None = None,
    reference_key_suffix: str = "",
) -> dict:
    """Scores every scan of ``shards`` (a glob) or ``dicom_dir`` into ``out`` (module docstring).

    ``predictor``: an already compiled :class:`calcjax.inference.Predictor` of this checkpoint, to score
    several cohorts without recompiling (default: built from the checkpoint).
    ``use_heart_region``: keep predicted calcium only in the heart's neighbourhood
    (``calcjax.heart_region``).
    ``lesion_completion_mm2``: complete each predicted lesion to its >= threshold component when that is at
    most this many mm^2 in-plane (``calcjax.lesion_completion``; 0: off, the default).
    ``dicom_seg`` / ``dicom_sr``: DICOM route only, write each scan's SEG / SR (``calcjax.dicom_outputs``).
    ``reference_scores_path``: a sheet of scan-level reference scores (``calcjax.io.reference_scores``:
    CSV or .xlsx, rows matched to scans by folder name + ``reference_key_suffix`` or by scan id) for the
    scans without reference labels.

    Returns a summary dict: scans scored now, skipped (already scored), failed, seconds, scans/min,
    slices/s, the forward pass's share of the time, and the report path (or None). Raises
    ``outputs.FolderBusyError`` when another job holds ``out`` and ``outputs.RunRecordError`` when
    ``resume`` would mix another model or other settings into it.
    """
    if (shards is None) == (dicom_dir is None):
        raise ValueError("give exactly one of --shards and --dicom")
    if shards is not None and (dicom_seg or dicom_sr):
        raise ValueError("--dicom_seg / --dicom_sr need --dicom: a shard scan has no source DICOM instances")
    if not lesion_completion_mm2 >= 0:  # also refuses NaN
        raise ValueError(f"lesion_completion_mm2 must be >= 0 (0: off), got {lesion_completion_mm2}")
    pid = jax.process_index()
    os.makedirs(out, exist_ok=True)
    # Process 0 holds the folder for the whole job (the other processes of a multi-host job write their
    # own part files under it); the kernel drops the lock when the process ends, however it ends.
    lock = outputs.FolderLock(out, "calcjax.score").acquire() if pid == 0 else None
    try:
        return _score_locked(
            checkpoint_path=checkpoint_path,
            out=out,
            shards=shards,
            dicom_dir=dicom_dir,
            labels_dir=labels_dir,
            salt_file=salt_file,
            which=which,
            resume=resume,
            save_masks=save_masks,
            batch_size=batch_size,
            score_kw=dict(mass_calibration=mass_calibration, kvp_specific_threshold=kvp_specific_threshold),
            use_heart_region=use_heart_region,
            lesion_completion_mm2=float(lesion_completion_mm2),
            dicom_outputs_asked=(dicom_seg, dicom_sr),
            num_bootstrap=num_bootstrap,
            progress=progress,
            predictor=predictor,
            reference=(reference_scores_path, reference_key_column, reference_key_suffix),
        )
    finally:
        if lock is not None:
            lock.release()


def _score_locked(
    *,
    checkpoint_path,
    out,
    shards,
    dicom_dir,
    labels_dir,
    salt_file,
    which,
    resume,
    save_masks,
    batch_size,
    score_kw,
    use_heart_region,
    lesion_completion_mm2,
    dicom_outputs_asked,
    num_bootstrap,
    progress,
    predictor,
    reference,
) -> dict:
    pid, pcount = jax.process_index(), jax.process_count()
    if pcount > 1:
        part_dir = os.path.join(out, "parts")
        os.makedirs(part_dir, exist_ok=True)
        scores_path = os.path.join(part_dir, f"scores-{pid:05d}-of-{pcount:05d}.jsonl")
        errors_path = os.path.join(part_dir, f"errors-{pid:05d}-of-{pcount:05d}.jsonl")
    else:
        scores_path, errors_path = os.path.join(out, SCORES), os.path.join(out, ERRORS)
    if not resume and (outputs.read_jsonl(scores_path) or outputs.read_jsonl(errors_path)):
        raise FileExistsError(f"{out} already holds scores: pass --resume to go on, or choose another --out")

    reference_scores_path, reference_key_column, reference_key_suffix = reference
    sheet, sheet_base = None, None
    if reference_scores_path is not None:
        sheet = reference_scores.read_reference_scores(reference_scores_path, reference_key_column)
        sheet_base = reference_scores.match_base(reference_scores_path, dicom_dir or ".")
    checkpoint_label = _checkpoint_name(checkpoint_path, which)  # before loading: a run may move on
    model_sha256 = checkpoint.content_sha256(checkpoint_path, which)
    dicom_seg, dicom_sr = dicom_outputs_asked
    if pid == 0:
        run_record = {
            "model_sha256": model_sha256,
            "route": "shards" if shards is not None else "dicom",
            "heart_region": use_heart_region,
            **score_kw,
        }
        if dicom_seg or dicom_sr:  # only when asked: folders scored before these existed still resume
            run_record.update(dicom_seg=dicom_seg, dicom_sr=dicom_sr)
        if lesion_completion_mm2:  # likewise
            run_record.update(lesion_completion_mm2=lesion_completion_mm2)
        if not resume and os.path.isfile(os.path.join(out, "run.json")):
            os.remove(os.path.join(out, "run.json"))  # nothing was scored into it: this run starts afresh
        outputs.check_run_record(
            out,
            "run",
            run_record,
            fix="resume with the same --checkpoint and settings, or choose another --out",
        )
    if predictor is None:
        _, model = checkpoint.load_for_inference(checkpoint_path, which)
        predictor = inference.Predictor(model, batch_size=batch_size)
    context = (predictor.in_channels - 1) // 2

    readers = None
    if shards is not None:
        scans, readers = scan_sources.shard_scans(shards, context=context)
        listing_errors = []
    else:
        given = deid.read_salt_file(salt_file) if salt_file else None
        salt = sharding.broadcast_text(lambda: deid.load_salt(out, given, given_from=salt_file or ""))
        private_map: dict[str, str] = {}
        scans, listing_errors = scan_sources.dicom_scans(
            dicom_dir,
            context=context,
            salt=salt,
            labels_dir=labels_dir,
            exclude=(out,),
            private_map=private_map,
        )
        if pid == 0:
            deid.update_private_map(out, private_map)
    mine = [s for i, s in enumerate(scans) if i % pcount == pid]
    done = {r["scan_id"] for r in outputs.read_jsonl(scores_path, repair=True)}
    old_errors = {json.dumps(e, sort_keys=True) for e in outputs.read_jsonl(errors_path, repair=True)}

    def record_error(entry: dict) -> None:
        key = json.dumps(entry, sort_keys=True)
        if key not in old_errors:
            outputs.append_jsonl(errors_path, entry)
            old_errors.add(key)

    if pid == 0:
        for e in listing_errors:
            record_error(e)
    if not scans:
        raise discover.no_scans_error(dicom_dir, listing_errors)
    overlay_dir = os.path.join(out, "overlays")
    mask_dir = os.path.join(out, "masks")
    todo = [s for s in mine if s.scan_id not in done]
    t_start = time.perf_counter()
    forward0 = predictor.forward_seconds
    scored = failed = slices = 0
    bar = tqdm(todo, desc="score", unit="scan", disable=not progress or pid != 0)
    try:
        for scan in bar:
            t0 = time.perf_counter()
            try:
                loaded = scan.load()
                pred = predictor.predict(loaded.hu, loaded.grid.spacing)
                region_status = "off"
                if use_heart_region:
                    region = heart_region.heart_region(loaded.hu, loaded.grid.spacing)
                    pred, region_status = heart_region.restrict(pred, region), region.status
                if lesion_completion_mm2:
                    threshold = agatston.threshold_for(  # the one score_row's figures use
                        score_rows.scan_kvp(loaded), kvp_specific_threshold=score_kw["kvp_specific_threshold"]
                    )
                    pred = lesion_completion.complete_lesions(
                        pred, loaded.hu, loaded.grid.spacing, lesion_completion_mm2, threshold
                    )
                    if use_heart_region:  # a completed component may reach past the region's edge
                        pred = heart_region.restrict(pred, region)
                ref_score = None
                if sheet is not None:
                    ref_score = reference_scores.match(
                        sheet,
                        scan_id=scan.scan_id,
                        scan_folder=scan.folder,
                        base=sheet_base,
                        key_suffix=reference_key_suffix,
                    )
                row = score_rows.score_row(scan, loaded, pred, ref_score, **score_kw)
                row["heart_region"] = region_status
            except Exception as e:  # a cohort run records each bad scan and goes on
                line = score_rows.error_line(scan, e)
                logging.warning("scan %s failed: %s", scan.scan_id, line["reason"])
                record_error(line)
                failed += 1
                continue
            if dicom_seg or dicom_sr:
                try:
                    row["dicom_outputs"] = ";".join(dicom_outputs.write_scan_outputs(
                        out, scan.scan_id, loaded.source_files, pred, row, seg=dicom_seg, sr=dicom_sr,
                        model_sha256=model_sha256,
                    ))  # fmt: skip
                except Exception as e:  # the scores stand; the SEG / SR failure is recorded
                    line = {**score_rows.error_line(scan, e), "stage": "dicom_outputs"}
                    logging.warning("scan %s: no DICOM outputs: %s", scan.scan_id, line["reason"])
                    record_error(line)
                    row["dicom_outputs"] = ""
            if save_masks:
                os.makedirs(mask_dir, exist_ok=True)
                labels.write_label_nifti(os.path.join(mask_dir, f"{scan.scan_id}.nii.gz"), pred, loaded.grid)
            if loaded.labels is not None:
                crops = score_rows.disagreement_crops(loaded, pred, row["threshold_hu"])
                row["disagreements"] = [{k: c[k] for k in ("kind", "voxels", "slice")} for c in crops]
                if crops:
                    os.makedirs(overlay_dir, exist_ok=True)
                    tmp = os.path.join(overlay_dir, f"{scan.scan_id}.tmp.npz")
                    arrays = {f"{i}_{k}": c[k] for i, c in enumerate(crops) for k in ("hu", "pred", "ref")}
                    np.savez_compressed(tmp, **arrays)
                    os.replace(tmp, os.path.join(overlay_dir, f"{scan.scan_id}.npz"))
            row["seconds"] = round(time.perf_counter() - t0, 3)
            outputs.append_jsonl(scores_path, row)
            scored += 1
            slices += row["num_slices"]
            elapsed = time.perf_counter() - t_start
            bar.set_postfix(scans_per_s=f"{scored / elapsed:.2f}", failed=failed)
    finally:
        bar.close()
        if readers is not None:
            readers.close()
    elapsed = time.perf_counter() - t_start
    forward = predictor.forward_seconds - forward0
    summary = {
        "scored": scored,
        "skipped_already_scored": len(mine) - len(todo),
        "failed": failed,
        "seconds": round(elapsed, 2),
        "scans_per_min": 60 * scored / elapsed if elapsed > 0 else 0.0,
        "slices_per_s": slices / elapsed if elapsed > 0 else 0.0,
        "forward_fraction": forward / elapsed if elapsed > 0 else 0.0,
        "devices": predictor.mesh.size,
        "report": None,
    }
    order = {s.scan_id: i for i, s in enumerate(scans)}
    if pcount > 1:
        sharding.barrier("calcjax.score:parts")
        if pid == 0:
            outputs.merge_parts(out, os.path.join(out, "parts"), order, pcount)
    if pid == 0:
        rows = outputs.read_jsonl(os.path.join(out, SCORES))
        rows.sort(key=lambda r: order.get(r["scan_id"], len(order)))
        outputs.write_csv(os.path.join(out, outputs.SCORES_CSV), rows)
        if sheet is not None:
            matched = sum(r.get("reference_source") == "sheet" for r in rows)
            summary["sheet_rows"], summary["sheet_rows_matched"] = len(sheet), matched
            if matched < len(sheet):
                logging.warning(
                    "%d of %d reference-score rows matched no scored scan "
                    "(check the key column and --reference_key_suffix)",
                    len(sheet) - matched,
                    len(sheet),
                )
        if any("reference_agatston" in r for r in rows):
            summary["report"] = report.write_report(
                out,
                rows,
                checkpoint=checkpoint_label,
                num_bootstrap=num_bootstrap,
            )
    summary["total_scores"] = len(outputs.read_jsonl(os.path.join(out, SCORES))) if pid == 0 else None
    return summary


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
    flags.DEFINE_float("mass_calibration", None, "mg per (HU x mm^3); mass is reported when given.")
    flags.DEFINE_bool("kvp_specific_threshold", False, "Calcium threshold from the scan's kVp.")
    flags.DEFINE_bool(
        "heart_region",
        True,
        "Keep predicted calcium only in the heart's neighbourhood (calcjax.heart_region).",
    )
    flags.DEFINE_float(
        "lesion_completion_mm2",
        0.0,
        "Complete each predicted lesion to its whole >= threshold component up to this in-plane area "
        "(mm^2; calcjax.lesion_completion). 0: off (the default, chosen on phantoms: docs/EXPERIMENTS.md).",
    )
    flags.DEFINE_bool("dicom_seg", False, "DICOM route: write OUT/dicom/<scan_id>.seg.dcm (DICOM SEG).")
    flags.DEFINE_bool("dicom_sr", False, "DICOM route: write OUT/dicom/<scan_id>.sr.dcm (TID 1500 SR).")
    flags.DEFINE_integer("num_bootstrap", 1000, "Bootstrap resamples for the report's CIs.")
    flags.DEFINE_string(
        "reference_scores", None, "CSV or .xlsx of scan-level reference Agatston (one row per scan)."
    )
    flags.DEFINE_string("reference_key_column", None, "Key column of --reference_scores (default: auto).")
    flags.DEFINE_string(
        "reference_key_suffix", "", "Sheet key = scan folder name + this suffix (COCA's chest sheet: 'A')."
    )


def main(argv):
    del argv
    if flags.FLAGS.out is None:
        raise app.UsageError("--out is required")
    if (flags.FLAGS.shards is None) == (flags.FLAGS.dicom is None):
        raise app.UsageError("give exactly one of --shards and --dicom")
    if flags.FLAGS.shards is not None and (flags.FLAGS.dicom_seg or flags.FLAGS.dicom_sr):
        raise app.UsageError("--dicom_seg / --dicom_sr need --dicom: a shard scan has no source instances")
    if not flags.FLAGS.lesion_completion_mm2 >= 0:
        raise app.UsageError("--lesion_completion_mm2 must be >= 0 (0: off)")
    logging.set_verbosity(logging.WARNING)
    sharding.initialize_distributed()
    summary = cli.run_or_exit(
        "calcjax.score",
        _score_from_flags,
        (
            model_file.ModelFileError,
            checkpoint.CheckpointError,
            discover.NoScansError,
            reference_scores.ReferenceScoresError,
            outputs.FolderBusyError,
            outputs.RunRecordError,
            deid.SaltError,
        ),
    )
    if jax.process_index() == 0:
        print(
            f"scored {summary['scored']} scans ({summary['skipped_already_scored']} already scored, "
            f"{summary['failed']} failed: see {os.path.join(flags.FLAGS.out, ERRORS)}) "
            f"in {summary['seconds']} s, "
            f"{summary['scans_per_min']:.1f} scans/min, {summary['slices_per_s']:.1f} slices/s "
            f"on {summary['devices']} device(s); {summary['total_scores']} rows in "
            f"{os.path.join(flags.FLAGS.out, SCORES)}"
        )
        if summary["report"]:
            print(f"report: {summary['report']}")


def _score_from_flags() -> dict:
    return score_cohort(
        checkpoint_path=flags.FLAGS.checkpoint,
        out=flags.FLAGS.out,
        shards=flags.FLAGS.shards,
        dicom_dir=flags.FLAGS.dicom,
        labels_dir=flags.FLAGS.labels,
        salt_file=flags.FLAGS.salt_file,
        which=flags.FLAGS.which,
        resume=flags.FLAGS.resume,
        save_masks=flags.FLAGS.save_masks,
        batch_size=flags.FLAGS.batch_size,
        mass_calibration=flags.FLAGS.mass_calibration,
        kvp_specific_threshold=flags.FLAGS.kvp_specific_threshold,
        use_heart_region=flags.FLAGS.heart_region,
        lesion_completion_mm2=flags.FLAGS.lesion_completion_mm2,
        dicom_seg=flags.FLAGS.dicom_seg,
        dicom_sr=flags.FLAGS.dicom_sr,
        num_bootstrap=flags.FLAGS.num_bootstrap,
        reference_scores_path=flags.FLAGS.reference_scores,
        reference_key_column=flags.FLAGS.reference_key_column,
        reference_key_suffix=flags.FLAGS.reference_key_suffix,
    )


def run() -> None:
    """The console command ``calcjax-score``."""
    cli.run_command("calcjax-score", "calcjax.score", __doc__, main, define_flags)


if __name__ == "__main__":
    run()
