"""Shard building as a library: discovery, shard plan, parallel shard writing, manifest and errors.

``python -m data_prep.build`` is its command line (see that module for the output layout).

Reruns: ``OUT/build.json`` records the settings and a fingerprint of the inputs (each scan's id, split,
label and its files' relative paths, sizes and modification times) before any shard is written, and each
shard's sidecar records the fingerprint of the scans and settings it was written from. A rerun with the
same inputs and settings finishes only the shards whose sidecar matches (a killed build resumes); a rerun
with other inputs or settings is refused with :class:`BuildRecordError` naming what changed, never
mixed into the old shards. One build per folder at a time (``calcjax.io.outputs.FolderLock``); shard-writing
worker processes are killed by the kernel when the build's process dies.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time

from tqdm import tqdm

from calcjax.io import deid, outputs, records
from calcjax.io import discover as discover_lib
from calcjax.io import shards as shard_folder
from calcjax.io.atomic import write_atomic
from calcjax.io.discover import discover, parse_split
from data_prep.shards import shard_done, sidecar_path, write_shard

BUILD_RECORD = "build"  # OUT/build.json
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class BuildRecordError(outputs.RunRecordError):
    """A rerun into a shard folder made from other inputs or settings."""


def load_salt(out: str, salt: str | None) -> str:
    """The build's salt (``calcjax.io.deid.load_salt``: ``--salt``, else ``OUT/salt.txt``, else new)."""
    return deid.load_salt(out, salt, given_from="--salt")


def job_fingerprint(job) -> str:
    """SHA-256 of what a scan's records are made from: id, split, label and its files' relative paths,
    sizes and modification times (a changed file changes it; reading every byte twice is avoided)."""
    h = hashlib.sha256(f"{job.scan_id}\0{job.split}\0{job.label_format}\0".encode())
    paths = list(job.files) + ([job.label_path] if job.label_path else [])
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, job.root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: the worker gets SIGKILL from the kernel when the build's process dies
    (``prctl(PR_SET_PDEATHSIG)``, Linux), so a SIGKILL of the build never leaves workers waiting for work
    for ever. No watchdog thread: threads in forked workers crashed array_record's writer here (the
    workers are spawned now; the rule stays)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the workers end when the pool's pipes close
    if os.getppid() != parent_pid:  # the build died before the request took effect
        os._exit(1)


def _remove_stale_temporaries(out: str) -> None:
    """Deletes what a killed build left half-written (never a finished shard or sidecar)."""
    for name in os.listdir(out):
        if ".array_record.tmp-" in name or (name.startswith(".") and ".json.tmp-" in name):
            os.remove(os.path.join(out, name))
        elif name.startswith(shard_folder.TFDS_METADATA_TMP):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def plan_shards(jobs, records_per_shard: int) -> dict[str, list[list]]:
    """Groups each split's scans (in scan-id order) into shards of about ``records_per_shard`` records."""
    plan: dict[str, list[list]] = {}
    for job in jobs:
        shards = plan.setdefault(job.split, [[]])
        if shards[-1] and sum(j.num_files for j in shards[-1]) + job.num_files > records_per_shard:
            shards.append([])
        shards[-1].append(job)
    return plan


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.array_record"


def _write(args):
    path, jobs, context, protocol, fingerprint, reslice_mm = args
    return write_shard(
        path, jobs, context=context, protocol=protocol, fingerprint=fingerprint, reslice_mm=reslice_mm
    )


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """The settings of one shard build (``python -m data_prep.build``'s flags).

    ``input_dir``: the folder tree searched for DICOM series (and labels); ``out``: the shard folder.
    ``split``: ratios by scan (``train=0.8,val=0.1,test=0.1``), assigned by a hash seeded with ``split_seed``;
    ``split_by``: ``series`` (each scan drawn on its own) or ``patient`` (every series of a patient in one
    split: ``calcjax.io.discover.patient_of``);
    ``context``: k, each record holding C = 2k+1 adjacent slices; ``workers``: processes writing shards;
    ``labels_dir``: a label tree mirroring the input; ``label_format``: ``auto`` / ``nifti`` / ``xml``;
    ``protocol``: an override of the protocol guess; ``records_per_shard``: the target shard size;
    ``salt``: the scan-id salt (default: ``out/salt.txt``, made once); ``progress``: a progress bar;
    ``reslice_mm``: > 0 writes every scan as contiguous slices that thick (``calcjax.io.reslice``: thin
    gated scans as the thick reconstructions chest protocols read), 0 as it is.
    """

    input_dir: str
    out: str
    split: str = "train=0.8,val=0.1,test=0.1"
    split_seed: int = 0
    split_by: str = "series"
    context: int = 1
    workers: int = 1
    labels_dir: str | None = None
    label_format: str = "auto"
    protocol: str | None = None
    records_per_shard: int = 512
    salt: str | None = None
    progress: bool = True
    reslice_mm: float = 0.0

    def settings(self) -> dict:
        """What the build record keeps of these options: a rebuild with others is refused (``split_by``
        and ``reslice_mm`` only when not the default, so the records of earlier builds still match)."""
        by_patient = {"split_by": self.split_by} if self.split_by != "series" else {}
        resliced = {"reslice_mm": self.reslice_mm} if self.reslice_mm else {}
        return {
            **by_patient,
            **resliced,
            "record_schema": records.SCHEMA_VERSION,
            "context": self.context,
            "split": self.split,
            "split_seed": self.split_seed,
            "label_format": self.label_format,
            "protocol": self.protocol,
            "records_per_shard": self.records_per_shard,
        }


def build(options: BuildOptions) -> dict:
    """Builds the shard folder ``options.out`` from ``options.input_dir``; returns the manifest (see module
    docstring).

    Raises ``calcjax.io.outputs.FolderBusyError`` when another build holds ``out``, BuildRecordError when
    ``out`` holds shards of other inputs or settings, NoScansError when ``input_dir`` has no CT series.
    """
    t0 = time.time()
    os.makedirs(options.out, exist_ok=True)
    with outputs.FolderLock(options.out, "data_prep.build"):
        manifest = _build_locked(options)
    manifest["seconds"] = round(time.time() - t0, 2)
    return manifest


def _build_locked(o: BuildOptions) -> dict:
    """Discovers the scans, checks the folder's build record, writes the shards not yet done and the
    manifest."""
    ratios = parse_split(o.split)
    private_map: dict[str, str] = {}
    jobs, errors = discover(
        o.input_dir, salt=load_salt(o.out, o.salt), split=ratios, split_seed=o.split_seed,
        labels_dir=o.labels_dir, label_format=o.label_format, exclude=(o.out,), private_map=private_map,
        split_by=o.split_by,
    )  # fmt: skip
    _remove_stale_temporaries(o.out)
    if not jobs:
        deid.update_private_map(o.out, private_map)
        write_atomic(os.path.join(o.out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in errors))
        raise discover_lib.no_scans_error(o.input_dir, errors)
    fingerprints = {j.scan_id: job_fingerprint(j) for j in jobs}
    _check_build_record(o, fingerprints)
    deid.update_private_map(o.out, private_map)
    tasks = _shard_tasks(o, plan_shards(jobs, o.records_per_shard), fingerprints)
    _write_shards([t for t in tasks if not shard_done(t[0], t[4])], len(tasks), o.workers, o.progress)
    return _manifest(o, tasks, errors, ratios)


def _check_build_record(o: BuildOptions, fingerprints: dict[str, str]) -> None:
    """Writes ``build.json`` (the settings and a fingerprint of the inputs), or refuses a folder built
    from other inputs or settings, or holding shards without a record."""
    inputs = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(fingerprints.items())).encode())
    record = {**o.settings(), "num_scans": len(fingerprints), "inputs_sha256": inputs.hexdigest()}
    if not os.path.isfile(os.path.join(o.out, f"{BUILD_RECORD}.json")) and glob.glob(
        os.path.join(o.out, "*.array_record")
    ):
        raise BuildRecordError(
            f"{o.out} holds shards without a build record (an older calcjax or another tool made them): "
            "build into a new --out, or delete the folder's shards to rebuild them here"
        )
    try:
        outputs.check_run_record(
            o.out,
            BUILD_RECORD,
            record,
            fix="build into a new --out (reuse the ids with --salt from its salt.txt), or delete the folder "
            "to rebuild it",
        )
    except outputs.RunRecordError as e:
        raise BuildRecordError(str(e)) from None


def _shard_tasks(o: BuildOptions, plan: dict, fingerprints: dict[str, str]) -> list[tuple]:
    """One ``(path, jobs, context, protocol, digest, reslice_mm)`` per planned shard; the digest of the
    settings and the shard's inputs says whether a shard already written is this one."""
    settings_json = json.dumps(o.settings(), sort_keys=True)
    tasks = []
    for name, shards in plan.items():
        for i, shard_jobs in enumerate(shards):
            path = os.path.join(o.out, shard_name(name, i, len(shards)))
            digest = hashlib.sha256(settings_json.encode())
            for j in shard_jobs:
                digest.update(fingerprints[j.scan_id].encode())
            tasks.append((path, shard_jobs, o.context, o.protocol, digest.hexdigest(), o.reslice_mm))
    return tasks


def _write_shards(todo: list[tuple], total: int, workers: int, progress: bool) -> None:
    """Writes the shards of ``todo`` (of ``total`` planned), in this process or in a pool of ``workers``."""
    with tqdm(
        total=total, initial=total - len(todo), desc="shards", unit="shard", disable=not progress
    ) as bar:
        if workers == 1:
            for t in todo:
                _write(t)
                bar.update()
            return
        # spawn, not fork: a process that imported jax (a notebook, a training script) is multithreaded, and a
        # fork of it can deadlock; spawned workers import only what writing shards needs (no jax).
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:  # fmt: skip
            for _ in pool.map(_write, todo):
                bar.update()


def _manifest(o: BuildOptions, tasks, errors, ratios) -> dict:
    """Writes and returns the folder's manifest (module docstring), TFDS metadata and errors.jsonl."""
    out, context = o.out, o.context
    splits: dict[str, dict] = {}
    scans = []
    all_errors = list(errors)
    for path, *_ in tasks:
        with open(sidecar_path(path)) as f:
            side = json.load(f)
        name = os.path.basename(path)
        split = name.split("-")[0]
        entry = splits.setdefault(split, {"shards": [], "num_records": 0, "calcium_records": []})
        offset = entry["num_records"]
        entry["shards"].append({"file": name, "num_records": side["num_records"], "first_record": offset})
        for scan in side["scans"]:
            scan["split_record_start"] = offset + scan["record_start"]
            entry["calcium_records"] += [
                scan["split_record_start"] + k for k in scan.get("calcium_slices", [])
            ]
            scans.append(scan)
        entry["num_records"] += side["num_records"]
        all_errors += side["errors"]
    manifest = {
        "schema_version": records.SCHEMA_VERSION,
        "manifest_version": shard_folder.MANIFEST_VERSION,
        "settings": {
            "context": context,
            "channels": 2 * context + 1,
            "image": "int16 HU (C, H, W), no window applied, "
            + (f"resliced to {o.reslice_mm:g} mm slices" if o.reslice_mm else "no resampling"),
            "label": "uint8 (H, W) of the centre slice: 0 background, 1 LM, 2 LAD, 3 LCX, 4 RCA",
            "split": dict(ratios),
            "split_seed": o.split_seed,
            "protocol_override": o.protocol,
            "label_format": o.label_format,
            **({"reslice_mm": o.reslice_mm} if o.reslice_mm else {}),
            "scan_id": "salted SHA-256 of the SeriesInstanceUID (where the files have none, of their "
            "SOPInstanceUIDs, else of the folder and physical series key; series_grouping: 'geometry')",
        },
        "splits": splits,
        "num_scans": len(scans),
        "num_records": sum(s["num_records"] for s in splits.values()),
        "num_errors": sum(e.get("severity") != "warning" for e in all_errors),
        "num_warnings": sum(e.get("severity") == "warning" for e in all_errors),
        "scans": scans,
    }
    shard_folder.write_tfds_metadata(
        out,
        {name: [(s["file"], s["num_records"]) for s in entry["shards"]] for name, entry in splits.items()},
        description="calcjax 2.5D CT slice stacks for coronary calcium segmentation; manifest.json holds "
        "the scans, their record ranges and the build's settings.",
    )
    shard_folder.write_manifest(out, manifest)
    write_atomic(os.path.join(out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in all_errors))
    return manifest
