"""Checkpoints: one `.npz` file holding parameters, optimizer state and the loop's state (epoch,
schedule, early stopping, metric history) as JSON text. Written atomically, so a crash mid-write
leaves the previous checkpoint intact; read with `allow_pickle=False`, so loading runs nothing."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from graphc.errors import error
from graphc.files import (
    MAX_JSON_BYTES,
    NPY_HEADER_BYTES,
    ListOf,
    Npz,
    atomic_write,
    check_schema,
    parse_json,
    short,
)
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


SCHEDULE_SCHEMA = {"epoch": int, "lr": float, "best?": (float, type(None)), "bad_epochs?": int}
LOOP_SCHEMA = {"epoch": int, "schedule": SCHEDULE_SCHEMA, "best": (float, type(None)), "best_epoch": int,
               "bad_epochs": int, "stopped_early": bool, "history": ListOf(dict)}
STEPS_SCHEMA = {"step": int, "best": (float, type(None)), "history": ListOf(dict)}   # runtime/steps.py
META_SCHEMA = {"format": str, "version": int, "model": str, "loop?": LOOP_SCHEMA, "seed?": int,
               "rng?": dict, "steps?": STEPS_SCHEMA}


def read_checkpoint(path: Path, program) -> tuple[dict, dict, dict]:
    """Parameters, optimizer state and loop state of a checkpoint, checked against `program`'s
    types but not loaded into it. Only the members `program` declares are read, each checked
    against its type before it is decompressed."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise error(f"{path}: no such checkpoint")
    wanted = [("param", name, info.type, "parameter") for name, info in program.param_info.items()]
    wanted += [("state", name, info.type, "optimizer state")
               for name, info in program.state_info.items()]
    limit = sum(math.prod(t.shape) * t.dtype.numpy.itemsize for _, _, t, _ in wanted) \
        + MAX_JSON_BYTES + (len(wanted) + 2) * (NPY_HEADER_BYTES + 1024)
    with Npz(None, path, limit, f"a checkpoint of {program.name} with its parameters") as npz:
        text = npz.read("meta", MAX_JSON_BYTES, what="the loop state (meta)")   # 4 bytes a character
        arrays = {kind: {} for kind in ("param", "state")}
        for kind, name, ttype, what in wanted:
            # The training program's checkpoints do not hold the constants of the preprocessing
            # that a trained program adds (graphc.ir.preprocess): those stay as the program has them.
            if (kind == "param" and program.param_info[name].role == CONSTANT_ROLE
                    and f"{kind}/{name}" not in npz.members):
                continue
            arrays[kind][name] = npz.read(f"{kind}/{name}", _nbytes(ttype), ttype.dtype.numpy,
                                          ttype.shape, f"{what} {name}")
    if text.dtype.kind != "U" or text.shape != ():
        raise error(f"{path}: malformed checkpoint: its loop state is not JSON text")
    meta = parse_json(str(text), path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise error(f"{path}: malformed checkpoint: not a graphc checkpoint of a version this "
                    f"graphc reads")
    check_schema(meta, META_SCHEMA, path)
    loop = meta.get("loop")     # absent where the Python API saved parameters alone
    counts = () if loop is None else (
        ("loop.epoch", loop["epoch"]), ("loop.best_epoch", loop["best_epoch"]),
        ("loop.bad_epochs", loop["bad_epochs"]), ("loop.schedule.epoch", loop["schedule"]["epoch"]))
    for key, value in counts:
        if value < 0:
            raise error(f"{path}: malformed checkpoint: {key} is {value}, below 0")
    if meta["model"] != program.name:
        raise error(f"{path}: malformed checkpoint: it belongs to model {short(meta['model'])!r}, "
                    f"not {program.name!r}")
    return arrays["param"], arrays["state"], meta


def _nbytes(ttype) -> int:
    return math.prod(ttype.shape) * ttype.dtype.numpy.itemsize
