r"""Batch scoring of a cohort with a trained checkpoint: ``python -m calcjax.score``.

  python -m calcjax.score --dicom DIR --out OUT      # the shipped model (calcjax/models/)
  python -m calcjax.score --shards 'SHARDS/test-*.array_record' --checkpoint RUN --out OUT
  python -m calcjax.score --dicom DIR --checkpoint RUN --out OUT [--labels LABELS] [--save_masks] \
      [--reference_scores SHEET.xlsx --reference_key_suffix A]

``--checkpoint`` is a training workdir (its ``best`` or ``latest`` checkpoint, ``--which``), one step
folder or a one-file model (``calcjax.model_file``, SHA-256 checked); without it, the shipped model
(``calcjax.model_file.DEFAULT_MODEL``). The model's config comes from the checkpoint. Scans stream one
at a time (memory is bounded by the largest scan, not the cohort): load -> jitted, batched forward
sharded over this process's devices (``calcjax.inference``) -> predicted labels -> ``calcjax.agatston``
(HU >= 130 inside the prediction).

Outputs in OUT:
- ``scores.jsonl``: one JSON line per scan, appended and flushed as each scan finishes (see ``score_row``);
- ``scores.csv``: the same rows flattened, rewritten at the end;
- ``errors.jsonl``: one line per scan or input that failed (source, stage, kind, reason; identifying
  header values redacted); the run goes on;
- ``masks/<scan_id>.nii.gz`` with ``--save_masks``: predicted labels on the scan's grid (RAS affine);
- where scans have reference labels: ``report.md`` and ``figures/`` (``calcjax.report``);
- ``salt.txt`` (DICOM route): the salt of the scan ids, reused on ``--resume``.

``--resume`` skips scans already in ``scores.jsonl`` (a line cut by a kill is dropped); without it a
non-empty OUT is refused. On several hosts, process i scores every scan whose index is i modulo the
process count into ``parts/``; after a barrier process 0 merges the parts into ``scores.jsonl`` in scan
order and writes the CSV and the report.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from scipy import ndimage
from tqdm import tqdm

from calcjax import agatston, checkpoint, inference, metrics, model_file, report, scan_sources, sharding
from calcjax.io import discover, labels, reference_scores

SCORES = "scores.jsonl"
ERRORS = "errors.jsonl"
OVERLAY_CROP = 96  # pixels: the side of the disagreement crop kept for the report's overlays


def score_row(
    scan: scan_sources.ScanInput,
    loaded: scan_sources.LoadedScan,
    pred: np.ndarray,
    reference: reference_scores.ReferenceScore | None = None,
    **kw,
) -> dict:
    """The output line of one scan (its keys are the CSV's columns, per-artery dicts flattened).

    Keys: scan_id, source, protocol, num_slices, slice_increment_mm, slice_thickness_mm, kvp,
    series_grouping (``uid``, or ``geometry`` for a series grouped without a SeriesInstanceUID), agatston,
    agatston_per_artery {LM, LAD, LCX, RCA}, volume_mm3, mass_mg (None unless ``mass_calibration``),
    risk_category (0-4), risk_category_name, num_lesions (counted 2D lesions); with reference labels also
    reference_agatston, reference_agatston_per_artery, reference_volume_mm3, reference_risk_category and
    ``evaluation`` (the :class:`calcjax.metrics.ScanSummary` fields, from which the report's figures come).
    ``reference_source`` says where the reference came from: ``mask`` (labels; wins when both exist) or
    ``sheet`` (``reference``: a scan-level score; its total gives the category, ``reference_artery_sum``
    keeps the sum of its per-artery figures, which need not equal the total).
    """
    spacing = loaded.grid.spacing
    kvp = loaded.meta.get("kvp") or 120.0
    s = agatston.score(loaded.hu, pred, spacing, kvp=kvp, **kw)
    row = {
        "scan_id": scan.scan_id,
        "source": scan.source,
        "protocol": loaded.meta.get("protocol") or "unknown",
        "num_slices": int(loaded.hu.shape[0]),
        "slice_increment_mm": float(spacing[0]),
        "slice_thickness_mm": loaded.meta.get("slice_thickness_mm"),
        "kvp": loaded.meta.get("kvp"),
        "series_grouping": loaded.meta.get("series_grouping", "uid"),
        "agatston": s["agatston"],
        "agatston_per_artery": s["agatston_per_artery"],
        "volume_mm3": s["volume_mm3"],
        "mass_mg": s["mass_mg"],
        "risk_category": s["risk_category"],
        "risk_category_name": s["risk_category_name"],
        "num_lesions": s["num_lesions"],
    }
    if loaded.labels is not None:
        r = agatston.score(loaded.hu, loaded.labels, spacing, kvp=kvp, **kw)
        row.update(
            reference_agatston=r["agatston"],
            reference_agatston_per_artery=r["agatston_per_artery"],
            reference_volume_mm3=r["volume_mm3"],
            reference_risk_category=r["risk_category"],
        )
        summary = metrics.summarize_scan(
            scan.scan_id, row["protocol"], pred, loaded.labels, loaded.hu, spacing, kvp=kvp, **kw
        )
        row["evaluation"] = {k: v for k, v in vars(summary).items() if k not in ("scan_id", "protocol")}
        row["reference_source"] = "mask"
    elif reference is not None:
        row.update(
            reference_agatston=reference.total,
            reference_agatston_per_artery={a: reference.per_artery.get(a) for a in agatston.ARTERIES},
            reference_risk_category=reference.risk_category,
            reference_source="sheet",
            reference_total_from=reference.total_from,
            reference_artery_sum=reference.artery_sum,
        )
    return row


DISAGREEMENT_KINDS = ("missed", "extra", "wrong artery")
_IN_PLANE_8 = np.zeros((3, 3, 3), bool)
_IN_PLANE_8[1] = True  # 8-connected within a slice, never across slices (as Agatston's lesions)


def disagreement_crops(
    loaded: scan_sources.LoadedScan, pred: np.ndarray, threshold_hu: float = 130.0
) -> list[dict]:
    """One crop per kind of disagreement, centred on that kind's largest in-plane component.

    Kinds (candidate voxels, HU >= ``threshold_hu``): ``missed`` (reference calcium predicted background),
    ``extra`` (predicted calcium the reference calls background), ``wrong artery`` (both calcium, other
    labels). Centring on the largest component, not on the mean of all differing voxels, keeps the crop
    on something when the differences are scattered (ribs on both sides and a plaque in the middle).

    Returns ``[{"kind", "voxels" (component size), "slice", "hu", "pred", "ref"}]`` with
    ``(OVERLAY_CROP, OVERLAY_CROP)`` crops, largest component first; [] when they agree.
    """
    cand = loaded.hu >= threshold_hu
    ref = np.where(cand, loaded.labels, 0)
    p = np.where(cand, pred, 0)
    masks = {
        "missed": (ref > 0) & (p == 0),
        "extra": (p > 0) & (ref == 0),
        "wrong artery": (p > 0) & (ref > 0) & (p != ref),
    }
    h, w = ref.shape[1:]
    half = OVERLAY_CROP // 2
    out = []
    for kind in DISAGREEMENT_KINDS:
        mask = masks[kind]
        if not mask.any():
            continue
        components, _ = ndimage.label(mask, structure=_IN_PLANE_8)
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        biggest = int(sizes.argmax())
        zs, ys, xs = np.nonzero(components == biggest)  # one slice: components never cross slices
        k = int(zs[0])
        cy = int(np.clip(int(round(ys.mean())), half, max(h - half, half)))
        cx = int(np.clip(int(round(xs.mean())), half, max(w - half, half)))
        win = (k, slice(max(cy - half, 0), cy + half), slice(max(cx - half, 0), cx + half))
        out.append(
            {
                "kind": kind,
                "voxels": int(sizes[biggest]),
                "slice": k,
                "hu": loaded.hu[win],
                "pred": pred[win],
                "ref": loaded.labels[win],
            }
        )
    out.sort(key=lambda c: -c["voxels"])
    return out


def read_jsonl(path: str, *, repair: bool = False) -> list[dict]:
    """The JSON lines of ``path`` ([] if absent). A last line cut short by a kill is dropped; with
    ``repair`` the file is truncated to its last whole line, so appends start clean."""
    if not os.path.isfile(path):
        return []
    rows, good_end = [], 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_end += len(line)
    if repair and good_end != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


def append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _flatten(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if k in ("evaluation", "disagreements"):
            continue
        if isinstance(v, dict):
            out.update({f"{k.replace('_per_artery', '')}_{a}": x for a, x in v.items()})
        else:
            out[k] = v
    return out


def write_csv(path: str, rows: list[dict]) -> None:
    """``rows`` flattened (per-artery columns) to CSV, atomically."""
    flat = [_flatten(r) for r in rows]
    columns: list[str] = []
    for r in flat:
        columns += [c for c in r if c not in columns]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(flat)
    os.replace(tmp, path)


def _salt(out: str, salt_file: str | None = None) -> str:
    """The scan-id salt kept in ``out/salt.txt``: copied from ``salt_file`` (e.g. a shard folder's, so
    the DICOM route names scans as the shards do), else the one already there, else a new random one."""
    path = os.path.join(out, "salt.txt")
    if salt_file is not None:
        with open(salt_file) as f:
            salt = f.read().strip()
        if os.path.isfile(path):
            with open(path) as f:
                if f.read().strip() != salt:
                    raise ValueError(f"{out} was scored with another salt than {salt_file}")
        with open(path, "w") as f:
            f.write(salt)
    if not os.path.isfile(path):
        with open(path, "w") as f:
            f.write(secrets.token_hex(16))
    with open(path) as f:
        return f.read().strip()


def _error_line(scan: scan_sources.ScanInput, e: Exception) -> dict:
    reason = getattr(e, "reason", None) or f"{e.__class__.__name__}: {str(e)[:300]}"
    if getattr(e, "path", None):  # the file inside the series that failed (the folder is ``input``)
        reason = f"{os.path.basename(e.path)}: {reason}"
    return {
        "scan_id": scan.scan_id,
        "input": scan.source,
        "stage": "score",
        "kind": getattr(e, "kind", e.__class__.__name__),
        "reason": discover.redact(reason, scan.identifiers),
    }


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
    ``reference_scores_path``: a sheet of scan-level reference scores (``calcjax.io.reference_scores``:
    CSV or .xlsx, rows matched to scans by folder name + ``reference_key_suffix`` or by scan id) for the
    scans without reference labels.

    Returns a summary dict: scans scored now, skipped (already scored), failed, seconds, scans/min,
    slices/s, the forward pass's share of the time, and the report path (or None).
    """
    if (shards is None) == (dicom_dir is None):
        raise ValueError("give exactly one of --shards and --dicom")
    pid, pcount = jax.process_index(), jax.process_count()
    os.makedirs(out, exist_ok=True)
    if pcount > 1:
        part_dir = os.path.join(out, "parts")
        os.makedirs(part_dir, exist_ok=True)
        scores_path = os.path.join(part_dir, f"scores-{pid:05d}-of-{pcount:05d}.jsonl")
        errors_path = os.path.join(part_dir, f"errors-{pid:05d}-of-{pcount:05d}.jsonl")
    else:
        scores_path, errors_path = os.path.join(out, SCORES), os.path.join(out, ERRORS)
    if not resume and (read_jsonl(scores_path) or read_jsonl(errors_path)):
        raise FileExistsError(f"{out} already holds scores: pass --resume to go on, or choose another --out")

    sheet, sheet_base = None, None
    if reference_scores_path is not None:
        sheet = reference_scores.read_reference_scores(reference_scores_path, reference_key_column)
        sheet_base = reference_scores.match_base(reference_scores_path, dicom_dir or ".")
    checkpoint_label = _checkpoint_name(checkpoint_path, which)  # before loading: a run may move on
    if predictor is None:
        _, model = checkpoint.load_for_inference(checkpoint_path, which)
        predictor = inference.Predictor(model, batch_size=batch_size)
    context = (predictor.in_channels - 1) // 2
    score_kw = dict(mass_calibration=mass_calibration, kvp_specific_threshold=kvp_specific_threshold)

    readers = None
    if shards is not None:
        scans, readers = scan_sources.shard_scans(shards, context=context)
        listing_errors = []
    else:
        salt = _broadcast_salt(out, salt_file) if pcount > 1 else _salt(out, salt_file)
        scans, listing_errors = scan_sources.dicom_scans(
            dicom_dir, context=context, salt=salt, labels_dir=labels_dir
        )
    mine = [s for i, s in enumerate(scans) if i % pcount == pid]
    done = {r["scan_id"] for r in read_jsonl(scores_path, repair=True)}
    old_errors = {json.dumps(e, sort_keys=True) for e in read_jsonl(errors_path, repair=True)}

    def record_error(entry: dict) -> None:
        key = json.dumps(entry, sort_keys=True)
        if key not in old_errors:
            append_jsonl(errors_path, entry)
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
                pred = predictor.predict(loaded.hu)
                ref_score = None
                if sheet is not None:
                    ref_score = reference_scores.match(
                        sheet,
                        scan_id=scan.scan_id,
                        scan_folder=scan.folder,
                        base=sheet_base,
                        key_suffix=reference_key_suffix,
                    )
                row = score_row(scan, loaded, pred, ref_score, **score_kw)
            except Exception as e:  # a cohort run records each bad scan and goes on
                logging.warning("scan %s failed: %s", scan.scan_id, _error_line(scan, e)["reason"])
                record_error(_error_line(scan, e))
                failed += 1
                continue
            if save_masks:
                os.makedirs(mask_dir, exist_ok=True)
                labels.write_label_nifti(os.path.join(mask_dir, f"{scan.scan_id}.nii.gz"), pred, loaded.grid)
            if loaded.labels is not None:
                crops = disagreement_crops(loaded, pred)
                row["disagreements"] = [{k: c[k] for k in ("kind", "voxels", "slice")} for c in crops]
                if crops:
                    os.makedirs(overlay_dir, exist_ok=True)
                    tmp = os.path.join(overlay_dir, f"{scan.scan_id}.tmp.npz")
                    arrays = {f"{i}_{k}": c[k] for i, c in enumerate(crops) for k in ("hu", "pred", "ref")}
                    np.savez_compressed(tmp, **arrays)
                    os.replace(tmp, os.path.join(overlay_dir, f"{scan.scan_id}.npz"))
            row["seconds"] = round(time.perf_counter() - t0, 3)
            append_jsonl(scores_path, row)
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
    if pcount > 1:
        sharding_barrier("calcjax.score:parts")
        if pid == 0:
            _merge_parts(out, scans, pcount)
    if pid == 0:
        rows = read_jsonl(os.path.join(out, SCORES))
        order = {s.scan_id: i for i, s in enumerate(scans)}
        rows.sort(key=lambda r: order.get(r["scan_id"], len(order)))
        write_csv(os.path.join(out, "scores.csv"), rows)
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
    summary["total_scores"] = len(read_jsonl(os.path.join(out, SCORES))) if pid == 0 else None
    return summary


def _checkpoint_name(path: str | None, which: str) -> str:
    """``<run folder>/<best|checkpoints>/<step>`` of the checkpoint used, or a model file's name and
    SHA-256 (for the report)."""
    if path is None or os.path.isfile(path):
        path = path or model_file.DEFAULT_MODEL
        return f"{os.path.basename(path)} (sha256 {model_file.sha256_of(path)})"
    folder = checkpoint.resolve(path, which)
    return os.sep.join(folder.rstrip(os.sep).split(os.sep)[-3:])


def sharding_barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _broadcast_salt(out: str, salt_file: str | None) -> str:
    """Process 0's salt on every process (they share OUT on a shared filesystem, or not)."""
    from jax.experimental import multihost_utils

    buf = np.zeros(256, np.uint8)  # the same shape on every process
    if jax.process_index() == 0:
        raw = _salt(out, salt_file).encode()[:256]
        buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(data).rstrip(b"\0").decode()


def _merge_parts(out: str, scans, pcount: int) -> None:
    """Process 0: the per-process part files -> ``scores.jsonl`` / ``errors.jsonl`` in scan order."""
    part_dir = os.path.join(out, "parts")
    order = {s.scan_id: i for i, s in enumerate(scans)}
    for name in ("scores", "errors"):
        rows = []
        for p in range(pcount):
            rows += read_jsonl(os.path.join(part_dir, f"{name}-{p:05d}-of-{pcount:05d}.jsonl"))
        rows.sort(key=lambda r: order.get(r.get("scan_id"), len(order)))
        tmp = os.path.join(out, f"{name}.jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, os.path.join(out, f"{name}.jsonl"))


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
    logging.set_verbosity(logging.WARNING)
    sharding.initialize_distributed()
    try:
        summary = _score_from_flags()
    except (
        model_file.ModelFileError,
        checkpoint.CheckpointError,
        discover.NoScansError,
        reference_scores.ReferenceScoresError,
        FileNotFoundError,
    ) as e:
        print(f"calcjax.score: error: {e}", file=sys.stderr)
        sys.exit(2)
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
        num_bootstrap=flags.FLAGS.num_bootstrap,
        reference_scores_path=flags.FLAGS.reference_scores,
        reference_key_column=flags.FLAGS.reference_key_column,
        reference_key_suffix=flags.FLAGS.reference_key_suffix,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
