"""Shard building as a library: discovery, shard plan, parallel shard writing, manifest and errors.

``python -m data_prep.build`` is its command line (see that module for the output layout).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import time

from tqdm import tqdm

from calcjax.io import discover as discover_lib
from calcjax.io import records
from calcjax.io.discover import discover, parse_split
from data_prep.shards import shard_done, sidecar_path, write_shard

MANIFEST_VERSION = 1


def load_salt(out: str, salt: str | None) -> str:
    if salt:
        return salt
    path = os.path.join(out, "salt.txt")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    value = secrets.token_hex(16)
    _atomic_write(path, value + "\n")
    return value


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _remove_stale_temporaries(out: str) -> None:
    """Deletes what a killed build left half-written (never a finished shard or sidecar)."""
    for name in os.listdir(out):
        if ".array_record.tmp-" in name or (name.startswith(".") and ".json.tmp-" in name):
            os.remove(os.path.join(out, name))


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
    path, jobs, context, protocol = args
    return write_shard(path, jobs, context=context, protocol=protocol)


def build(
    input_dir: str,
    out: str,
    *,
    split: str = "train=0.8,val=0.1,test=0.1",
    split_seed: int = 0,
    context: int = 1,
    workers: int = 1,
    labels_dir: str | None = None,
    label_format: str = "auto",
    protocol: str | None = None,
    records_per_shard: int = 512,
    salt: str | None = None,
    progress: bool = True,
) -> dict:
    """Builds the shard folder ``out`` from ``input_dir``; returns the manifest (see module docstring)."""
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    ratios = parse_split(split)
    jobs, errors = discover(
        input_dir,
        salt=load_salt(out, salt),
        split=ratios,
        split_seed=split_seed,
        labels_dir=labels_dir,
        label_format=label_format,
    )
    _remove_stale_temporaries(out)
    if not jobs:
        _atomic_write(os.path.join(out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in errors))
        raise discover_lib.no_scans_error(input_dir, errors)
    plan = plan_shards(jobs, records_per_shard)
    tasks = []
    for name, shards in plan.items():
        for i, shard_jobs in enumerate(shards):
            path = os.path.join(out, shard_name(name, i, len(shards)))
            tasks.append((path, shard_jobs, context, protocol))
    todo = [t for t in tasks if not shard_done(t[0])]
    with tqdm(
        total=len(tasks), initial=len(tasks) - len(todo), desc="shards", unit="shard", disable=not progress
    ) as bar:
        if workers == 1:
            for t in todo:
                _write(t)
                bar.update()
        else:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_write, todo):
                    bar.update()
    manifest = _manifest(out, tasks, errors, ratios, split_seed, context, protocol, label_format)
    manifest["seconds"] = round(time.time() - t0, 2)
    return manifest


def _manifest(out, tasks, errors, ratios, split_seed, context, protocol, label_format) -> dict:
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
        "manifest_version": MANIFEST_VERSION,
        "settings": {
            "context": context,
            "channels": 2 * context + 1,
            "image": "int16 HU (C, H, W), no window applied, no resampling",
            "label": "uint8 (H, W) of the centre slice: 0 background, 1 LM, 2 LAD, 3 LCX, 4 RCA",
            "split": dict(ratios),
            "split_seed": split_seed,
            "protocol_override": protocol,
            "label_format": label_format,
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
    _atomic_write(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1))
    _atomic_write(os.path.join(out, "errors.jsonl"), "".join(json.dumps(e) + "\n" for e in all_errors))
    return manifest
