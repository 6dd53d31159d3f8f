"""``python -m calcjax.native.build``: compiles ``onednn_kernels.cc`` and ``batchnorm_kernels.cc`` into
``libcalcjax_cpu.so`` beside them.

Inputs: the FFI headers of the installed jaxlib (``jax.ffi.include_dir()``), oneDNN's headers and library
from the ``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` wheels (installed under ``sys.prefix``: ``include/``
and ``lib/``) and a C++17 compiler with OpenMP (``$CXX``, else ``g++``). The library is written to a
temporary name and renamed, so a failed or interrupted build leaves the previous one intact.
``--if_possible`` (``make install``) reports a missing compiler or oneDNN and exits 0: calcjax then uses
XLA's own kernels.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(name) for name in ("onednn_kernels.cc", "batchnorm_kernels.cc"))
LIBRARY = Path(__file__).with_name("libcalcjax_cpu.so")
DNNL_HEADER = "oneapi/dnnl/dnnl.hpp"
DNNL_LIBRARY = "libdnnl.so.3"


class BuildError(RuntimeError):
    """What the build lacks (compiler, headers, library) or the compiler's message."""


def dnnl_dirs(prefix: str = sys.prefix) -> tuple[Path, Path]:
    """oneDNN's include and library folders under ``prefix`` (where the onednn wheels put them)."""
    include, lib = Path(prefix, "include"), Path(prefix, "lib")
    if not (include / DNNL_HEADER).is_file():
        raise BuildError(f"{include / DNNL_HEADER} not found: pip install onednn-devel-cpu-gomp")
    if not (lib / DNNL_LIBRARY).is_file():
        raise BuildError(f"{lib / DNNL_LIBRARY} not found: pip install onednn-cpu-gomp")
    return include, lib


def compile_command(out: Path) -> list[str]:
    """The compiler's command line: a shared library with oneDNN found at run time under ``sys.prefix``."""
    import jax

    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(f"C++ compiler {compiler!r} not found (set $CXX)")
    include, lib = dnnl_dirs()
    return [
        compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off",
        "-Wno-return-type", "-Wno-attributes", "-Wno-psabi",
        f"-I{jax.ffi.include_dir()}", f"-I{include}", *map(str, SOURCES),
        "-o", str(out), f"-L{lib}", f"-l:{DNNL_LIBRARY}", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def build(out: Path = LIBRARY) -> Path:
    """Compiles the library to ``out`` (atomically); raises :class:`BuildError` with the reason."""
    partial = out.with_name(out.name + f".partial{os.getpid()}")
    result = subprocess.run(compile_command(partial), capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"compiling {', '.join(s.name for s in SOURCES)} failed:\n{result.stderr[-4000:]}")
    os.replace(partial, out)
    return out


def up_to_date(out: Path = LIBRARY) -> bool:
    """Whether ``out`` exists and is newer than every source."""
    return out.is_file() and all(out.stat().st_mtime >= s.stat().st_mtime for s in SOURCES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--if_possible", action="store_true", help="a missing toolchain is not an error")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    if up_to_date() and not args.force:
        print(f"{LIBRARY} is up to date")
        return 0
    try:
        print(f"built {build()}")
    except BuildError as e:
        print(f"calcjax.native.build: {e}", file=sys.stderr)
        if args.if_possible:
            print("calcjax will use XLA's CPU kernels (slower on CPU; no effect on accelerators)")
            return 0
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
