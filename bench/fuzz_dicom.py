"""A seeded DICOM fuzzer: mutated series through ``data_prep.build`` and ``calcjax.score``, and the rules
every answer must keep.

  python -m bench.fuzz_dicom --cases 1000 --seed 0 [--out OUT] [--real DIR]

Each case is one series, derived from a small phantom (cardiac, or a 40-slice window of a chest scan,
48x48) or, one case in a hundred, from a real gated scan of the sample (``--real``: the folder holding
``coca-sample/``; skipped when absent), with its UIDs made its own and one mutation of
:data:`calcjax_fuzz.MUTATIONS` (bench/fuzz_mutations.py) applied: attributes the reader uses removed,
retyped, out of range, NaN, zero, negative or huge; a file truncated; pixel data and its description
disagreeing; lossless compression under each syntax the codecs encode, and corrupt compressed data; a
classic file claiming several frames; slices missing or duplicated; files renamed, reordered, nested or
linked; identifying attributes and UIDs removed; series that are not CT. Every case's folder goes into one
input tree, built by ``python -m data_prep.build`` and scored by ``python -m calcjax.score --dicom`` (one
process each, as users run them). The rules:

- no ``Traceback`` on either command's stderr, and exit status 0 (2 only when nothing at all is usable);
- every case is a score row or an ``errors.jsonl`` line whose reason names the attribute or the part of
  the file the mutation touched (``unexplained`` counts the others);
- a mutation that leaves the image's meaning unchanged scores exactly as its unmutated base, and a
  damaging one that is scored anyway scores as its base (``silent_changes`` counts the others).

Prints one JSON line: ``{"cases": N, "tracebacks": 0, "unexplained": 0, "silent_changes": 0, "scored": ..,
"refused": .., "build_exit": .., "score_exit": .., "seconds": ..}``; ``OUT/cases.jsonl`` holds every
case's mutation, outcome and reason. ``make fuzz`` runs 1,000 cases; ``tests/test_fuzz_dicom.py`` a slice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import fuzz_mutations as fm  # noqa: E402
from calcjax.io import deid, outputs  # noqa: E402

SALT = "calcjax-fuzz-salt-2026"


def write_cases(out: str, n: int, seed: int, real: str | None) -> list[dict]:
    """Writes ``n`` cases (and one unmutated case per base) under ``out/cases``; their descriptions."""
    bases = fm.phantom_bases()
    real_base = fm.real_base(real) if real else None
    rng = random.Random(seed)
    cases = [{"case": f"base-{k}", "base": k, "mutation": "none", "expect": "preserve"} for k in bases]
    for i in range(n):
        use_real = real_base is not None and i % 100 == 50
        base = "real" if use_real else rng.choice(sorted(bases))
        mutation = fm.MUTATIONS[i % len(fm.MUTATIONS)] if i < len(fm.MUTATIONS) else rng.choice(fm.MUTATIONS)
        cases.append({"case": f"case-{i:04d}", "base": base, "mutation": mutation.name,
                      "expect": mutation.expect, "keywords": list(mutation.keywords)})  # fmt: skip
    if real_base is not None:
        bases["real"] = real_base
        cases.append({"case": "base-real", "base": "real", "mutation": "none", "expect": "preserve"})
    by_name = {m.name: m for m in fm.MUTATIONS}
    for c in cases:
        base = bases[c["base"]]
        files = fm.fresh_uids(base["entries"], c["case"])
        mutation = by_name.get(c["mutation"])
        if mutation is not None:
            files = mutation.apply(files, random.Random(f"{seed}:{c['case']}"))
        fm.write_series(os.path.join(out, "cases", c["case"]), files, os.path.join(out, "linked"), base)
    return cases


def run(cmd: list[str]) -> tuple[int, str]:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return done.returncode, done.stderr


def outcomes(folder: str) -> dict[str, dict]:
    """{case: {"rows": [...], "errors": [...]}} of an output folder, through its private map."""
    case_of = {name: rel.split(os.sep)[0] for name, rel in deid.read_private_map(folder).items()}
    result: dict[str, dict] = {}
    for kind, file, key in (("rows", outputs.SCORES, "scan_id"), ("errors", outputs.ERRORS, "input")):
        for r in outputs.read_jsonl(os.path.join(folder, file)):
            result.setdefault(case_of.get(r.get(key), "?"), {"rows": [], "errors": []})[kind].append(r)
    return result


def judge(case: dict, got: dict, base_rows: dict) -> str:
    """``scored`` / ``refused`` when the rules hold, else ``unexplained`` or ``silent_change``: a scored
    case must score as its base (whatever it expects); a preserving one must be scored; a refused one needs
    a reason naming one of its keywords."""
    rows, errors = got.get("rows", []), [e for e in got.get("errors", []) if e.get("severity") != "warning"]
    base = base_rows.get(case["base"])
    if rows:
        return (
            "scored"
            if len(rows) == 1 and base is not None and fm.same_score(rows[0], base)
            else "silent_change"
        )
    if case["expect"] == "preserve":
        return "unexplained"
    text = " ".join(e.get("reason", "") + " " + e.get("kind", "") for e in errors).lower()
    return "refused" if errors and any(k.lower() in text for k in case["keywords"]) else "unexplained"


def fuzz(out: str, n: int, seed: int, real: str | None) -> dict:
    t0 = time.time()
    cases = write_cases(out, n, seed, real)
    inputs = os.path.join(out, "cases")
    salt = os.path.join(out, "salt.txt")
    with open(salt, "w") as f:
        f.write(SALT)
    py, shards, scores = sys.executable, os.path.join(out, "shards"), os.path.join(out, "score")
    build_rc, build_err = run([py, "-m", "data_prep.build", f"--input={inputs}", f"--out={shards}",
                               f"--salt={SALT}", "--workers=2"])  # fmt: skip
    score_rc, score_err = run([py, "-m", "calcjax.score", f"--dicom={inputs}", f"--out={scores}",
                               f"--salt_file={salt}", "--num_bootstrap=0"])  # fmt: skip
    got = outcomes(scores)
    base_rows = {c["base"]: got[c["case"]]["rows"][0] for c in cases
                 if c["mutation"] == "none" and got.get(c["case"], {}).get("rows")}  # fmt: skip
    verdicts = []
    with open(os.path.join(out, "cases.jsonl"), "w") as f:
        for c in cases:
            g = got.get(c["case"], {})
            c["verdict"] = judge(c, g, base_rows)
            c["reasons"] = [e.get("reason", "")[:300] for e in g.get("errors", [])]
            verdicts.append(c["verdict"])
            f.write(json.dumps(c) + "\n")
    tracebacks = ("Traceback" in build_err) + ("Traceback" in score_err)
    return {"cases": len(cases), "tracebacks": tracebacks, "unexplained": verdicts.count("unexplained"),
            "silent_changes": verdicts.count("silent_change"), "scored": verdicts.count("scored"),
            "refused": verdicts.count("refused"), "build_exit": build_rc, "score_exit": score_rc,
            "seconds": round(time.time() - t0, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default="", help="folder for the cases and outputs (default: a new temp, removed)"
    )
    p.add_argument("--real", default=os.environ.get("CALCJAX_REAL_DATA", ""), help="folder with coca-sample/")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="calcjax-fuzz-")
    try:
        print(json.dumps(fuzz(out, args.cases, args.seed, args.real or None)))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
