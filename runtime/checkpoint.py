"""Checkpoints: one `.npz` file holding parameters, optimizer state and the loop's state (epoch,
schedule, early stopping, metric history) as JSON text. Written atomically, so a crash mid-write
leaves the previous checkpoint intact; read with `allow_pickle=False`, so loading runs nothing."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from graphc.errors import error
from graphc.files import atomic_write
from graphc.ir.preprocess import CONSTANT_ROLE

FORMAT, VERSION = "graphc-checkpoint", 1


def save_checkpoint(path: Path, program, loop_state: dict) -> None:
    arrays = {f"param/{k}": np.asarray(v) for k, v in program.params.items()}
    arrays |= {f"state/{k}": np.asarray(v) for k, v in program.state.items()}
    meta = {"format": FORMAT, "version": VERSION, "model": program.name, **loop_state}
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(Path(path), buf.getvalue())


def load_checkpoint(path: Path, program) -> dict:
    """Restore parameters and optimizer state into `program`; return the loop's state."""
    params, state, meta = read_checkpoint(path, program)
    for name in program.param_info:
        if name in params:          # (a preprocessing's constants may be left out)
            program.params[name] = params[name]
    program.state = {name: state[name] for name in program.state_info}
    return meta


def read_checkpoint(path: Path, program) -> tuple[dict, dict, dict]:
    """Parameters, optimizer state and loop state of a checkpoint, checked against `program`'s
    types but not loaded into it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise error(f"{path}: no such checkpoint") from None
    except ValueError as err:
        raise error(f"{path}: refused: {err}") from None
    except Exception as err:    # a damaged zip raises many kinds of errors
        raise error(f"{path}: not a readable checkpoint ({err})") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError("not a graphc checkpoint of a version this graphc reads")
        if meta.get("model") != program.name:
            raise ValueError(f"it belongs to model {meta.get('model')!r}, not {program.name!r}")
    except (KeyError, ValueError, AttributeError) as err:
        raise error(f"{path}: malformed checkpoint: {err}") from None
    params = {k[6:]: v for k, v in arrays.items() if k.startswith("param/")}
    state = {k[6:]: v for k, v in arrays.items() if k.startswith("state/")}
    for name, info in program.param_info.items():
        # The training program's checkpoints do not hold the constants of the preprocessing
        # that a trained program adds (graphc.ir.preprocess): those stay as the program has them.
        if info.role != CONSTANT_ROLE or name in params:
            _check(path, "parameter", name, params, info.type)
    for name, info in program.state_info.items():
        _check(path, "optimizer state", name, state, info.type)
    return params, state, meta


def _check(path: Path, what: str, name: str, arrays: dict, ttype) -> None:
    if name not in arrays:
        raise error(f"{path}: {what} {name} is missing")
    a = arrays[name]
    if a.dtype != ttype.dtype.numpy or a.shape != tuple(ttype.shape):
        raise error(f"{path}: {what} {name} should be {ttype}, found {a.dtype}{list(a.shape)}")
