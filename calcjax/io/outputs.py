"""The output folder of a batch job: JSON lines, the CSV, the folder lock and the run record.

- JSON lines (``scores.jsonl``, ``errors.jsonl``) are appended and fsynced line by line, so a kill loses
  at most the line being written; :func:`read_jsonl` drops a line cut short (and ``repair`` truncates it).
- Whole files (the CSV, merged parts, records) are written to a temporary name and renamed into place.
- :class:`FolderLock`: one job per output folder. An exclusive ``fcntl.flock`` on ``OUT/.calcjax.lock``,
  held for the job's life and released by the kernel when the process ends however it ends (a killed job
  never leaves a stale lock). A second job on the same folder is refused with :class:`FolderBusyError`.
- :func:`check_run_record`: ``OUT/<name>.json`` records what made the folder's contents (the model's
  content hash, scoring settings, ...); a job that would add to the folder with other values is refused
  with :class:`RunRecordError` naming each difference, so one folder never mixes two models or two
  definitions.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import threading
import time

from calcjax.io.atomic import write_atomic
from calcjax.io.dicom_series import OUTPUT_FOLDER_MARKER

SCORES = "scores.jsonl"
ERRORS = "errors.jsonl"
SCORES_CSV = "scores.csv"
LOCK_FILE = OUTPUT_FOLDER_MARKER  # its presence also keeps the folder out of input searches


class FolderBusyError(RuntimeError):
    """Another job holds the output folder."""


class RunRecordError(ValueError):
    """A job whose model or settings differ from those that made the folder's contents."""


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
    """One JSON line appended and fsynced."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str, rows: list[dict]) -> None:
    """``rows`` as JSON lines, atomically."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def flatten_row(row: dict) -> dict:
    """A score row for the CSV: per-artery dicts become ``<key>_<artery>`` columns; the nested
    ``evaluation`` and ``disagreements`` stay in the JSON lines only."""
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
    flat = [flatten_row(r) for r in rows]
    columns: list[str] = []
    for r in flat:
        columns += [c for c in r if c not in columns]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=columns)
    w.writeheader()
    w.writerows(flat)
    write_atomic(path, text.getvalue())


class ErrorLog:
    """``errors.jsonl`` of a job that may be resumed: each distinct entry written once, however often the
    same input fails across resumes; threads of one job may record side by side."""

    def __init__(self, path: str):
        self.path = path
        self._seen = {json.dumps(e, sort_keys=True) for e in read_jsonl(path, repair=True)}
        self._lock = threading.Lock()

    def record(self, entry: dict) -> None:
        key = json.dumps(entry, sort_keys=True)
        with self._lock:
            if key not in self._seen:
                append_jsonl(self.path, entry)
                self._seen.add(key)


class FolderLock:
    """Exclusive lock of an output folder for one job (module docstring); a context manager.

    ``job``: a short name of the job (``calcjax.score``) written into the lock file with the process id,
    the host's process start time and nothing else (no paths, no arguments).
    """

    def __init__(self, folder: str, job: str):
        self.folder, self.job = folder, job
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another job"
            os.close(fd)
            raise FolderBusyError(
                f"{self.folder} is in use by {holder}: wait for it to finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.job} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_record(folder: str, name: str, record: dict, *, fix: str) -> None:
    """Writes ``folder/<name>.json`` = ``record``, or, when it exists, refuses a different one.

    Raises RunRecordError naming every key whose value differs (``fix``: what the user can do)."""
    path = os.path.join(folder, f"{name}.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
        if diff:
            changes = "; ".join(f"{k}: {old.get(k)!r} then, {record.get(k)!r} now" for k in diff)
            raise RunRecordError(f"{folder} was made with other {name} settings ({changes}): {fix}")
        return
    write_atomic(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def merge_parts(folder: str, part_dir: str, order: dict[str, int], pcount: int) -> None:
    """The per-process part files of a multi-host job -> ``scores.jsonl`` / ``errors.jsonl`` in scan
    order (``order``: scan id -> index; lines without a known scan id go last)."""
    for name in ("scores", "errors"):
        rows = []
        for p in range(pcount):
            rows += read_jsonl(os.path.join(part_dir, f"{name}-{p:05d}-of-{pcount:05d}.jsonl"))
        rows.sort(key=lambda r: order.get(r.get("scan_id"), len(order)))
        write_jsonl(os.path.join(folder, f"{name}.jsonl"), rows)
