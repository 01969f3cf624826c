"""Helpers the commands of cli.py, train_cli.py and search_cli.py share: the --backend option,
reporting a file's lint warnings, reading an array file given on the command line."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from graphc.errors import GraphcError, error

if TYPE_CHECKING:
    import numpy as np


def report_lints(checked, werror: bool) -> str:
    """Print the file's lint warnings to stderr; with --Werror they are errors. Returns them as
    printed (the build cache replays them)."""
    from graphc.lints import lint
    found = lint(checked)
    if werror and found:
        raise GraphcError([replace(d, severity="error") for d in found])
    text = "\n".join(d.render() for d in found)
    if text:
        print(text, file=sys.stderr)
    return text


def add_backend_arg(p: argparse.ArgumentParser, precision: bool = False) -> None:
    """The --backend option (and, with `precision`, --precision) of a command that runs a program."""
    from graphc.targets import BACKEND_NAMES, PRECISIONS
    p.add_argument("--backend", default="numpy", choices=BACKEND_NAMES,
                   help="numpy (the reference), llvm (fused native kernels for this CPU) or cuda "
                        "(generated CUDA kernels on an NVIDIA GPU, through pycuda)")
    if precision:
        p.add_argument("--precision", default="f32", choices=PRECISIONS,
                       help="matrix products in f32 (IEEE, the default) or, with --backend cuda, "
                            "tf32 on the tensor cores (about 1e-3 relative error; docs/cuda.md)")


def load_array(path: str) -> np.ndarray:
    """An array (or an .npz archive) from a file given on the command line; errors name the file."""
    import numpy as np
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except ValueError as err:
        raise error(f"{path}: not a .npy array file ({err})") from None
    except OSError as err:
        raise error(f"{path}: cannot read: {err}") from None


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
