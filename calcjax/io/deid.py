"""De-identification of everything calcjax writes: the salt, pseudonymous input names, redaction.

Outputs (shards, manifests, ``errors.jsonl``, score rows, reports, logs) never carry text of an input's
path or an identifying header value:

- **Salt** (``salt.txt`` in a shard or score folder): the secret of every salted hash below. At least
  :data:`MIN_SALT_CHARS` characters (an empty or short salt makes the ids guessable from the UIDs); written
  once, atomically (temporary file + rename), and reused so reruns keep their ids. Keep it private.
- **Names**: a series is named by its scan id (``scan-`` + salted hash, ``calcjax.io.discover``); a file
  that is no series' by ``file-`` + the first 12 hex digits of SHA-256(salt + its path relative to the
  searched folder); a file inside a series by ``<scan id> file <i> of <n>``.
- **Private map** (``inputs.private.tsv`` beside ``salt.txt``, :data:`PRIVATE_MAP`): ``name<TAB>relative
  path`` for every name an output uses, so the user who owns the inputs can trace a line back. Like the
  salt it stays private: remove both before sharing a folder.
- **Redaction** (:func:`redact`): identifying header values in a message (longest first), and
  :func:`scrub_paths`: the searched folder and every path component below it (folder and file names,
  however they were spelt) -- the second line of defence for messages of libraries that quote paths.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets

from calcjax.io.atomic import write_atomic

REDACTED = "<redacted>"
PATH_REDACTED = "<path>"
SALT_FILE = "salt.txt"
PRIVATE_MAP = "inputs.private.tsv"
MIN_SALT_CHARS = 12
_MIN_COMPONENT_CHARS = 3  # shorter folder names ("CT", "1") are too common to redact as words


class SaltError(ValueError):
    """An empty, short or conflicting salt."""

    kind = "bad_salt"


def check_salt(salt: str, where: str) -> str:
    """``salt`` stripped, or SaltError when it is shorter than :data:`MIN_SALT_CHARS` characters."""
    salt = salt.strip()
    if len(salt) < MIN_SALT_CHARS:
        raise SaltError(
            f"the salt from {where} has {len(salt)} characters; at least {MIN_SALT_CHARS} are needed "
            f"(an empty or short salt makes scan ids guessable): remove it to have a random one made, "
            f"or give a longer one"
        )
    return salt


def load_salt(folder: str, given: str | None = None, *, given_from: str = "--salt") -> str:
    """The salt of ``folder`` (module docstring): ``given`` (checked against the one already in
    ``folder/salt.txt``, kept there), else the one in ``salt.txt``, else a new random one written there."""
    path = os.path.join(folder, SALT_FILE)
    existing = None
    if os.path.isfile(path):
        with open(path) as f:
            existing = check_salt(f.read(), path)
    if given is not None:
        given = check_salt(given, given_from)
        if existing is not None and existing != given:
            raise SaltError(f"{folder} was made with another salt than {given_from}: use another folder")
        if existing is None:
            write_atomic(path, given + "\n")
        return given
    if existing is not None:
        return existing
    salt = secrets.token_hex(16)
    write_atomic(path, salt + "\n")
    return salt


def read_salt_file(path: str) -> str:
    """The checked salt kept in the file ``path``."""
    with open(path) as f:
        return check_salt(f.read(), path)


def file_name(salt: str, rel_path: str) -> str:
    """The pseudonymous name of a file that belongs to no series (module docstring)."""
    return "file-" + hashlib.sha256((salt + "\0" + rel_path).encode()).hexdigest()[:12]


def file_in_series(scan_id: str, index: int, count: int) -> str:
    """``<scan id> file <index+1> of <count>``: a file named by its position in its series."""
    return f"{scan_id} file {index + 1} of {count}"


def read_private_map(folder: str) -> dict[str, str]:
    """``{name: path relative to the input}`` of ``folder/inputs.private.tsv`` ({} when there is none)."""
    path = os.path.join(folder, PRIVATE_MAP)
    known: dict[str, str] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                name, _, rel = line.rstrip("\n").partition("\t")
                if name:
                    known[name] = rel
    return known


def update_private_map(folder: str, entries: dict[str, str]) -> None:
    """Adds ``name -> relative path`` entries to ``folder/inputs.private.tsv`` (atomically; kept sorted)."""
    path = os.path.join(folder, PRIVATE_MAP)
    known = read_private_map(folder)
    merged = {**known, **entries}
    if merged == known:
        return
    write_atomic(path, "".join(f"{k}\t{v}\n" for k, v in sorted(merged.items())))


def redact(text: str, identifiers) -> str:
    """Replaces every identifying header value (longest first) in ``text``."""
    for value in sorted(identifiers, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def scrub_paths(text: str, root: str, paths=()) -> str:
    """``text`` without the folder ``root`` (as given, absolute and resolved) and without any component of
    ``paths`` below ``root`` (folder and file names of at least 3 characters, case-insensitive)."""
    words = {root, os.path.abspath(root), os.path.realpath(root)}
    for p in paths:
        words.add(p)
        words.add(os.path.abspath(p))
        rel = os.path.relpath(os.path.abspath(p), os.path.abspath(root))
        if not rel.startswith(".."):
            words.update(c for c in rel.split(os.sep) if len(c) >= _MIN_COMPONENT_CHARS)
    for w in sorted((w for w in words if w and w not in (os.sep, ".")), key=len, reverse=True):
        text = re.sub(re.escape(w), PATH_REDACTED, text, flags=re.IGNORECASE)
    return text
