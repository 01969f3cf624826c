"""Build artifacts: a folder with the graphs (versioned JSON), the parameters (.npz) and a manifest.

Loading never executes anything from the files: JSON is parsed, arrays are read with
`allow_pickle=False`, every node is rebuilt through the op table, and file hashes are checked.
Every file is written to a temporary name and renamed into place, the manifest last. The train
step's contract (graphc.ir.contract.TrainStep) is the manifest's `train_step` entry; artifacts of
graphc 0.1.0 saved before it was recorded still load: their contract is derived from the train
step's output names (TrainStep.of_legacy_graph).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError, error
from graphc.files import (
    ANY,
    CALL,
    MAX_JSON_BYTES,
    NPY_HEADER_BYTES,
    ListOf,
    MapOf,
    Npz,
    atomic_write,
    check_schema,
    is_identifier,
    is_safe_name,
    parse_json,
    read_bytes,
    short,
)
from graphc.ir.serialize import FORMAT as GRAPH_FORMAT
from graphc.ir.serialize import VERSION as GRAPH_VERSION
from graphc.ir.serialize import graph_from_json, graph_to_json, type_from_json, type_to_json
from graphc.ir.types import dim_factors
from graphc.targets import backend_for
from graphc.version import __version__

FORMAT = "graphc-artifact"
VERSION = 1
GRAPH_FILE, PARAMS_FILE, MANIFEST_FILE = "graph.json", "params.npz", "manifest.json"
MAX_PARAM_BYTES = 4 << 30    # parameters and optimizer state together
MAX_GRAPH_BYTES = 4 << 30    # the values of one graph for one sample (symbolic sizes as 1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_artifact(program, path, preprocessing=None) -> Path:
    """Write `program` to folder `path`; with `preprocessing` (a graphc.ir.preprocess record the
    program does not hold yet), the saved graphs hold it at their feature input."""
    import io

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    graphs, param_info, values = program.graphs, program.param_info, dict(program.params)
    if preprocessing:
        graphs, param_info, values = preprocessing.apply_to(graphs, param_info, values)
    preprocessing = preprocessing or program.preprocessing
    graph_bytes = json.dumps({"format": GRAPH_FORMAT, "version": GRAPH_VERSION,
                              "graphs": {k: graph_to_json(g) for k, g in graphs.items()}},
                             separators=(",", ":")).encode()   # compact: json's fast C encoder
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(v) for name, v in values.items()})
    params_bytes = buf.getvalue()
    manifest = {
        "format": FORMAT, "version": VERSION, "graphc_version": __version__,
        "model": program.name, "backend": program.backend,
        "inputs": {n.attr["name"]: type_to_json(n.type) for g in graphs.values()
                   for n in g.inputs},
        "state": [{"name": st.name, "type": type_to_json(st.type), "init": st.init}
                  for st in program.state_info.values()],
        "outputs": program.outputs,
        "params": [{"name": p.name, "type": type_to_json(p.type), "role": p.role,
                    "init": [p.init[0], [list(kv) for kv in p.init[1]]]}
                   for p in param_info.values()],
        "files": {GRAPH_FILE: _sha256(graph_bytes), PARAMS_FILE: _sha256(params_bytes)},
        **({"train_step": program.train_step_contract.to_json()}
           if program.train_step_contract else {}),
        **program.meta,
        **({"preprocess": preprocessing.to_json()} if preprocessing else {}),
    }
    atomic_write(out / GRAPH_FILE, graph_bytes)
    atomic_write(out / PARAMS_FILE, params_bytes)
    atomic_write(out / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    return out


def _read(folder: Path, name: str, limit: int) -> bytes:
    if not (folder / name).exists() and not (folder / name).is_symlink():
        raise error(f"{folder}: not a graphc artifact: {name} is missing",
                    hint="build one with `graphc build FILE.nn -o DIR`")
    return read_bytes(folder / name, limit)


def _shapes(value) -> bool:
    """A list of shapes whose sizes are numbers or symbol names (data, never code)."""
    return isinstance(value, list) and all(
        isinstance(s, list) and all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in s)
        for s in value)


_TYPE = list    # [dtype, [dims]]: checked by type_from_json
# the settings the runtime reads; the compiler's train spec may add others
TRAIN_SCHEMA = {"data": CALL, "optimizer": CALL, "schedule": CALL, "early_stop?": (CALL, type(None)),
                "batch": int, "epochs": int, "seed": int, "validation": float, "test": float,
                "scale": str, "augment?": ListOf(CALL), "device?": str, "*": ANY}
MANIFEST_SCHEMA = {
    "format": str, "version": int, "graphc_version?": str, "model": str,
    "backend?": (str, type(None)), "inputs": MapOf(_TYPE),
    "state?": ListOf({"name": str, "type": _TYPE, "init": float}),
    "outputs?": ListOf(str),
    "params": ListOf({"name": str, "type": _TYPE, "role": str, "init": list}),
    "files": MapOf(str),
    # the program's meta: where it came from and what its train block says
    "source?": (str, type(None)), "seed?": int,
    "task?": {"features": ListOf(str), "labels": ListOf(str), "kind": (str, type(None)),
              "output?": str, "scores?": str},
    "train?": (TRAIN_SCHEMA, type(None)), "batch_norm?": list,
    # the data-parallel ranks its train step was built for (all_reduce nodes); absent: one
    "ranks?": int,
    # the train step's contract (graphc.ir.contract.TrainStep.from_json checks its entries)
    "train_step?": {"loss": str, "updates": ListOf(dict), "feeds": dict},
    # the input preprocessing the graphs hold (graphc.ir.preprocess.Preprocessing.from_json checks it)
    "preprocess?": dict,
    # a language model's character vocabulary and context (runtime/text_data.py; graphc sample)
    "text?": {"vocab": str, "context": int},
}
GRAPH_SCHEMA = {"format": str, "version": int, "graphs": MapOf(dict)}


def read_artifact(path, backend: str | None = "numpy") -> dict:
    """The arguments of the `Program` an artifact folder holds (program.load_artifact makes it),
    on `backend` (None: the one its train block's `device` asks for). Any problem is a
    `GraphcError` naming the file; nothing is read beyond the bounds in docs/architecture.md
    (file sizes, parameter bytes, bytes per sample of the graphs)."""
    from graphc.ir.contract import TrainStep
    from graphc.ir.preprocess import Preprocessing

    folder = Path(path)
    if not folder.is_dir():
        raise error(f"{folder}: no such artifact folder")
    manifest = _read_manifest(folder)
    try:
        model, infos, inputs, state = _declarations(manifest)
        param_bytes = _declared_bytes([*infos.values(), *state.values()])
        blobs = {}
        for name, limit in ((GRAPH_FILE, MAX_JSON_BYTES),
                            (PARAMS_FILE, _npz_bound(param_bytes, infos))):
            data = _read(folder, name, limit)
            if _sha256(data) != manifest["files"].get(name):
                raise error(f"{folder / name}: contents do not match the manifest "
                            f"(corrupt or edited)")
            blobs[name] = data
        graphs = _read_graphs(folder / GRAPH_FILE, blobs[GRAPH_FILE])
        for key, graph in graphs.items():
            _check_sources(key, graph, infos, inputs, state)
            _check_graph_bytes(folder / GRAPH_FILE, key, graph)
        _check_task(manifest.get("task"), inputs, graphs["forward"])
        lr = (manifest.get("train") or {}).get("optimizer", [None, {"lr": 0.0}])[1].get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"the train block's learning rate is {short(repr(lr))}, not a number")
        train_step = None
        if "train_step" in graphs:
            train_step = (TrainStep.from_json(manifest["train_step"]) if "train_step" in manifest
                          else TrainStep.of_legacy_graph(graphs["train_step"], infos, state))
            _check_updates(graphs["train_step"], train_step, infos, state)
        preprocessing = (Preprocessing.from_json(manifest["preprocess"])
                         if "preprocess" in manifest else None)
        if preprocessing is not None and preprocessing.input not in inputs:
            raise ValueError(f"the preprocessing scales {preprocessing.input!r}, which is no input")
    except GraphcError:
        raise
    except NotImplementedError as err:
        raise error(f"{folder}: unsupported artifact: {err}") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise error(f"{folder}: malformed artifact: {_reason(err)}") from None
    values = _load_params(folder / PARAMS_FILE, blobs[PARAMS_FILE], infos)
    meta = {k: manifest[k] for k in ("source", "seed", "task", "train", "batch_norm", "ranks", "text")
            if k in manifest}
    if not _shapes(meta.get("batch_norm", [])):
        raise error(f"{folder / MANIFEST_FILE}: malformed artifact: bad batch_norm entry")
    return dict(name=model, graphs=graphs, params=infos, values=values,
                backend=backend_for(meta.get("train"), backend), meta=meta, state=state,
                train_step=train_step, preprocessing=preprocessing)


def _read_manifest(folder: Path) -> dict:
    manifest = parse_json(_read(folder, MANIFEST_FILE, MAX_JSON_BYTES), folder / MANIFEST_FILE)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise error(f"{folder / MANIFEST_FILE}: not a graphc artifact manifest")
    if manifest.get("version") != VERSION:
        raise error(f"{folder}: artifact format version {manifest.get('version')!r} is not "
                    f"supported (this graphc reads version {VERSION})",
                    hint="rebuild it with this version of graphc")
    check_schema(manifest, MANIFEST_SCHEMA, folder / MANIFEST_FILE)
    return manifest


def _declarations(manifest: dict) -> tuple[str, dict, dict, dict]:
    """The model's name and the parameters, inputs and optimizer state the manifest declares."""
    from graphc.ir.contract import ParamInfo, StateInfo
    model = manifest["model"]
    if not is_identifier(model):
        raise ValueError(f"'model' must be a name (letters, digits, _), not {short(model)!r}")
    infos = {}
    for p in manifest["params"]:
        init = (str(p["init"][0]), tuple((str(k), v) for k, v in p["init"][1]))
        info = ParamInfo(_name(p["name"]), type_from_json(p["type"]), str(p["role"]), init)
        _ = info.type.dtype.numpy   # a dtype the numpy backend cannot hold is refused here
        infos[info.name] = info
    inputs = {_name(k): type_from_json(v) for k, v in manifest["inputs"].items()}
    state = {}
    for st in manifest.get("state", []):
        info = StateInfo(_name(st["name"]), type_from_json(st["type"]), float(st["init"]))
        _ = info.type.dtype.numpy
        state[info.name] = info
    return model, infos, inputs, state


def _read_graphs(path: Path, data: bytes) -> dict:
    doc = parse_json(data, path)
    if not isinstance(doc, dict) or doc.get("format") != GRAPH_FORMAT \
            or doc.get("version") != GRAPH_VERSION:
        raise ValueError("unknown graph format or version")
    check_schema(doc, GRAPH_SCHEMA, path)
    graphs = {str(k): graph_from_json(g, f"{path}: graph {short(k, 40)}")
              for k, g in doc["graphs"].items()}
    if "forward" not in graphs:
        raise ValueError(f"{GRAPH_FILE} has no forward graph")
    return graphs


def _name(name) -> str:
    if not is_safe_name(name):
        raise ValueError(f"{short(str(name))!r} is not a name graphc makes (no /, \\, control "
                         f"characters, . or ..)")
    return name


def _check_task(task: dict | None, inputs: dict, forward) -> None:
    """The task names declared inputs and a forward output, as `graphc train` and `eval` use it."""
    if task is None:
        return
    for name in task["features"] + task["labels"]:
        if name not in inputs:
            raise ValueError(f"task names input {short(name)!r}, which the manifest does not declare")
    if task["kind"] not in (None, "classification", "regression"):
        raise ValueError(f"unknown task kind {short(task['kind'])!r}")
    if "output" in task and task["output"] not in forward.output_map:
        raise ValueError(f"task names output {short(task['output'])!r}, which the forward graph "
                         f"does not have")


def _declared_bytes(infos) -> int:
    """The bytes of the parameters and optimizer state the manifest declares, within the bound."""
    total = 0
    for info in infos:
        if not info.type.is_concrete:
            raise ValueError(f"{info.name} has symbolic shape {info.type}")
        total += math.prod(info.type.shape) * info.type.dtype.numpy.itemsize
    if total > MAX_PARAM_BYTES:
        raise ValueError(f"the parameters and optimizer state take {total:,} bytes, over the limit "
                         f"of {MAX_PARAM_BYTES:,}")
    return total


def _npz_bound(param_bytes: int, infos: dict) -> int:
    """The largest params.npz that holds exactly the declared arrays (headers and zip records
    included, with room to spare)."""
    return param_bytes + (len(infos) + 1) * (NPY_HEADER_BYTES + 1024)


def _check_graph_bytes(path: Path, key: str, graph) -> None:
    """Refuse graphs whose values, per sample (symbolic sizes counted as 1), exceed the bound: a
    type-correct node such as broadcast_to [1000000000, N, 10] would fail only when run."""
    total = 0
    for node in graph.nodes():
        elements = math.prod(dim_factors(d)[0] for d in node.type.shape)
        try:
            itemsize = node.type.dtype.numpy.itemsize
        except NotImplementedError:
            itemsize = 2
        size = elements * itemsize
        total += size
        if total > MAX_GRAPH_BYTES:
            what = f"node {node.op} {node.name or ''}".rstrip()
            raise error(f"graph {key} needs over {MAX_GRAPH_BYTES:,} bytes of buffers per sample "
                        f"(reached at {what}: {node.type}, {size:,} bytes); refused", file=path)


def _reason(err: Exception) -> str:
    return f"missing field {err}" if isinstance(err, KeyError) else str(err)


def _check_sources(key: str, graph, infos: dict, inputs: dict, state: dict) -> None:
    """Artifacts hold lowered graphs whose inputs, parameters and state are the manifest's."""
    from graphc.ir import OPS
    for node in graph.nodes():
        if OPS[node.op].is_composite:
            raise ValueError(f"graph {key} holds the composite op {node.op}; artifacts hold "
                             f"lowered graphs")
        if node.op in ("param", "input", "state"):
            name = node.attr["name"]
            table = {"param": infos, "input": inputs, "state": state}[node.op]
            want = table.get(name)
            want = want if want is None or node.op == "input" else want.type
            if want is None:
                raise ValueError(f"graph {key} uses {node.op} {name!r}, which the manifest "
                                 f"does not declare")
            if want != node.type:
                raise ValueError(f"graph {key} uses {node.op} {name} as {node.type}, the manifest "
                                 f"says {want}")


def _check_updates(graph, train_step, infos: dict, state: dict) -> None:
    """Each update of the train step's contract names an output of its graph and a parameter or
    state slot of the manifest's, of that output's type."""
    outputs = graph.output_map
    for u in train_step.updates:
        table = state if u.in_state else infos
        if u.output not in outputs or u.target not in table:
            raise ValueError(f"train-step update {u.output!r} -> {u.target!r} names no output or "
                             f"no {'state' if u.in_state else 'parameter'} of the artifact")
        if outputs[u.output].type != table[u.target].type:
            raise ValueError(f"train-step update {u.output!r} is {outputs[u.output].type}, "
                             f"{u.target} is {table[u.target].type}")


def _load_params(path: Path, data: bytes, infos: dict) -> dict[str, np.ndarray]:
    """The declared parameters, each member's size and type checked before it is read; members
    the manifest does not name are never read."""
    import io
    with Npz(io.BytesIO(data), path) as npz:
        return {name: npz.read(name, math.prod(info.type.shape) * info.type.dtype.numpy.itemsize,
                               info.type.dtype.numpy, info.type.shape, f"parameter {name}")
                for name, info in infos.items()}
