"""Helpers the commands of cli.py, train_cli.py and search_cli.py share: the --backend option,
reporting a file's lint warnings, reading an array file given on the command line."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from graphc.errors import GraphcError, error

if TYPE_CHECKING:
    import numpy as np


def report_lints(checked, werror: bool, show: bool = True) -> str:
    """Print the file's lint warnings to stderr (`show` False: not printed, as on the ranks but
    rank 0 of a data-parallel run); with --Werror they are errors. Returns them as printed (the
    build cache replays them)."""
    from graphc.lints import lint
    found = lint(checked)
    if werror and found:
        raise GraphcError([replace(d, severity="error") for d in found])
    text = "\n".join(d.render() for d in found)
    if text and show:
        print(text, file=sys.stderr)
    return text


def add_backend_arg(p: argparse.ArgumentParser, precision: bool = False,
                    default: str | None = "numpy") -> None:
    """The --backend option (and, with `precision`, --precision) of a command that runs a program;
    `default` None leaves the choice to the train block (`backend`, else `device`, else auto)."""
    from graphc.targets import BACKEND_CHOICES, PRECISIONS
    said = "the train block's `backend` or `device`, else auto" if default is None else default
    p.add_argument("--backend", default=default, choices=BACKEND_CHOICES,
                   help=f"numpy (each graph node by node in numpy), llvm (fused native kernels "
                        f"for this CPU), cuda (generated CUDA kernels on an NVIDIA GPU, through "
                        f"pycuda) or auto (llvm where llvmlite loads, else numpy); default: {said}")
    if precision:
        p.add_argument("--precision", default="f32", choices=PRECISIONS,
                       help="matrix products in f32 (IEEE, the default) or, with --backend cuda, "
                            "tf32 on the tensor cores (about 1e-3 relative error; docs/cuda.md)")


def load_array(path: str) -> np.ndarray:
    """A .npy array given on the command line, read within MAX_DATA_BYTES (its header checked
    before the data is read); errors name the file."""
    from graphc.files import MAX_DATA_BYTES, read_npy
    return read_npy(Path(path), MAX_DATA_BYTES)


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, each within MAX_DATA_BYTES and all together too."""
    import zipfile

    from graphc.files import MAX_DATA_BYTES, Npz, open_regular
    with open_regular(Path(path)) as f:
        if not zipfile.is_zipfile(f):
            f.seek(0)
            if f.read(6) == b"\x93NUMPY":
                raise error(f"{path}: a single array; name the input it is for, as NAME={path}")
            raise error(f"{path}: not an .npz archive (not a zip file)")
        f.seek(0)
        with Npz(f, Path(path)) as npz:
            arrays, left = {}, MAX_DATA_BYTES
            for name in npz.names:
                arrays[name] = npz.read(name, left)
                left -= arrays[name].nbytes
            return arrays


def configure_logging(debug: bool) -> None:
    """One handler on stderr: graphc's own warnings, and everything (the libraries' logs too:
    Dask's cluster chatter) only with --debug."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("graphc: %(message)s"))
    if not debug:
        handler.addFilter(lambda record: record.levelno >= (
            logging.WARNING if record.name == "graphc" or record.name.startswith("graphc.")
            else logging.ERROR))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "graphc", False)]:
        root.removeHandler(old)                 # main() called again in one process (tests)
    handler.graphc = True
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
