"""The house rules that a reader of the code relies on: small functions and modules in ``calcjax/``, every
package under import-linter's layering, docs/ARCHITECTURE.md naming exactly the modules that exist, and
documentation that speaks of the project alone (no numbered work periods, no issue numbers, no files
outside the repository)."""

from __future__ import annotations

import ast
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "calcjax")
MAX_FUNCTION_LINES, MAX_PARAMETERS, MAX_MODULE_LINES, MAX_README_LINES = 80, 10, 500, 250
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "results"}
TEXT_SUFFIXES = (".py", ".md", ".toml", ".cfg", ".sh", ".sbatch", "Makefile", ".txt")
DIARY = re.compile(r"\b(sessions?|issues?|work\s+periods?)\s+#?\d+\b|DESIGN\.md|FACTS\.md", re.IGNORECASE)
# The real sample is found beside the checkout by code that looks for it, and named nowhere else.
OUTSIDE = re.compile(r"\.\./shared\b|\.\.[/\\]\.\.")
MAY_LOOK_OUTSIDE = {"Makefile"}


def _modules() -> list[str]:
    """Every Python file under calcjax/, relative to the repository root."""
    out = []
    for dirpath, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        out += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files if f.endswith(".py")]
    return sorted(out)


def _functions(path: str):
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [x for x in (a.vararg, a.kwarg) if x]
            if params and params[0].arg in ("self", "cls"):
                params = params[1:]
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1, len(params)


def test_functions_and_modules_fit_on_a_screen():
    too_long = []
    for path in _modules():
        with open(os.path.join(ROOT, path)) as f:
            lines = len(f.read().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path}: {lines} lines")
        for name, lineno, length, params in _functions(path):
            if length > MAX_FUNCTION_LINES or params > MAX_PARAMETERS:
                too_long.append(f"{path}:{lineno} {name}: {length} lines, {params} parameters")
    assert not too_long, "\n".join(too_long)


def test_every_package_is_in_the_layering_contract():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    layered = {name.strip() for layer in layers for name in layer.split("|")}
    packages = {
        f"calcjax.{d}" for d in os.listdir(PACKAGE) if os.path.isfile(os.path.join(PACKAGE, d, "__init__.py"))
    }
    stray = [p for p in os.listdir(PACKAGE) if p.endswith(".py") and p != "__init__.py"]
    assert layered == packages and not stray, (layered ^ packages, stray)


def test_the_architecture_map_names_exactly_the_modules_that_exist():
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")) as f:
        text = f.read()
    named = set(re.findall(r"^\| `(calcjax/[\w/]+\.py)` \|", text, re.MULTILINE))
    # Subpackage __init__ files hold only their docstring; the root one is the API and is named.
    exist = {m for m in _modules() if not m.endswith("/__init__.py") or m == "calcjax/__init__.py"}
    missing, extra = sorted(exist - named), sorted(named - exist)
    assert not missing and not extra, f"named, not there: {extra}; there, not named: {missing}"
    for package in {m.split("/")[1] for m in exist if m.count("/") > 1}:
        assert f"calcjax.{package}" in text, f"calcjax.{package} is not drawn in docs/ARCHITECTURE.md"


def _text_files():
    for dirpath, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(TEXT_SUFFIXES) or name == "Makefile":
                yield os.path.relpath(os.path.join(dirpath, name), ROOT)


def test_documentation_and_code_speak_of_the_project_alone():
    found = []
    for path in _text_files():
        with open(os.path.join(ROOT, path), errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if DIARY.search(line) or (OUTSIDE.search(line) and path not in MAY_LOOK_OUTSIDE):
                    found.append(f"{path}:{lineno}: {line.strip()[:120]}")
    assert not found, "\n".join(found)


def test_the_readme_is_short():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= MAX_README_LINES
