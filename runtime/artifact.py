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
from pathlib import Path

import numpy as np

import graphc
from graphc.backends import backend_for
from graphc.errors import GraphcError, error
from graphc.files import atomic_write
from graphc.ir.serialize import FORMAT as GRAPH_FORMAT
from graphc.ir.serialize import VERSION as GRAPH_VERSION
from graphc.ir.serialize import graph_from_json, graph_to_json, type_from_json, type_to_json

FORMAT = "graphc-artifact"
VERSION = 1
GRAPH_FILE, PARAMS_FILE, MANIFEST_FILE = "graph.json", "params.npz", "manifest.json"


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
        "format": FORMAT, "version": VERSION, "graphc_version": graphc.__version__,
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


def _read(folder: Path, name: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except FileNotFoundError:
        raise error(f"{folder}: not a graphc artifact: {name} is missing",
                    hint="build one with `graphc build FILE.nn -o DIR`") from None
    except OSError as err:
        raise error(f"{folder / name}: cannot read: {err.strerror}") from None


def _shapes(value) -> bool:
    """A list of shapes whose sizes are numbers or symbol names (data, never code)."""
    return isinstance(value, list) and all(
        isinstance(s, list) and all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in s)
        for s in value)


def load_artifact(path, backend: str | None = "numpy"):
    """Restore a `Program` from an artifact folder, on `backend` (None: the one its train block's
    `device` asks for). Any problem is a `GraphcError` naming the file."""
    from graphc.ir.contract import ParamInfo, StateInfo, TrainStep
    from graphc.ir.preprocess import Preprocessing
    from graphc.runtime.program import Program

    folder = Path(path)
    if not folder.is_dir():
        raise error(f"{folder}: no such artifact folder")
    try:
        manifest = json.loads(_read(folder, MANIFEST_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{folder / MANIFEST_FILE}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise error(f"{folder / MANIFEST_FILE}: not a graphc artifact manifest")
    if manifest.get("version") != VERSION:
        raise error(f"{folder}: artifact format version {manifest.get('version')!r} is not "
                    f"supported (this graphc reads version {VERSION})",
                    hint="rebuild it with this version of graphc")
    try:
        files = manifest["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' must map file names to hashes")
        blobs = {}
        for name in (GRAPH_FILE, PARAMS_FILE):
            data = _read(folder, name)
            if _sha256(data) != files.get(name):
                raise error(f"{folder / name}: contents do not match the manifest "
                            f"(corrupt or edited)")
            blobs[name] = data
        model = manifest["model"]
        if not isinstance(model, str):
            raise ValueError("'model' must be a name")
        infos = {}
        for p in manifest["params"]:
            init = (str(p["init"][0]), tuple((str(k), v) for k, v in p["init"][1]))
            info = ParamInfo(str(p["name"]), type_from_json(p["type"]), str(p["role"]), init)
            _ = info.type.dtype.numpy   # a dtype the numpy backend cannot hold is refused here
            infos[info.name] = info
        inputs = {str(k): type_from_json(v) for k, v in manifest["inputs"].items()}
        state = {}
        for st in manifest.get("state", []):
            info = StateInfo(str(st["name"]), type_from_json(st["type"]), float(st["init"]))
            _ = info.type.dtype.numpy
            state[info.name] = info
        graph_doc = json.loads(blobs[GRAPH_FILE])
        if graph_doc.get("format") != GRAPH_FORMAT or graph_doc.get("version") != GRAPH_VERSION:
            raise ValueError("unknown graph format or version")
        graphs = {str(k): graph_from_json(g, f"{folder / GRAPH_FILE}: graph {k}")
                  for k, g in graph_doc["graphs"].items()}
        if "forward" not in graphs:
            raise ValueError(f"{GRAPH_FILE} has no forward graph")
        for key, graph in graphs.items():
            _check_sources(key, graph, infos, inputs, state)
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
    meta = {k: manifest[k] for k in ("source", "seed", "task", "train", "batch_norm") if k in manifest}
    if not isinstance(meta.get("seed", 0), int) or not isinstance(meta.get("task", {}), dict) \
            or not isinstance(meta.get("train", {}), dict) or not _shapes(meta.get("batch_norm", [])):
        raise error(f"{folder / MANIFEST_FILE}: malformed artifact: bad seed, task, train or "
                    f"batch_norm entry")
    return Program(model, graphs, infos, values, backend=backend_for(meta.get("train"), backend),
                   meta=meta, state=state, train_step=train_step, preprocessing=preprocessing)


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
    import io
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as err:   # object arrays need pickle, which is refused
        raise error(f"{path}: refused: {err}") from None
    except Exception as err:    # a damaged zip raises many kinds of errors
        raise error(f"{path}: not a readable .npz file ({err})") from None
    values = {}
    for name, info in infos.items():
        if name not in arrays:
            raise error(f"{path}: parameter {name} is missing")
        array = arrays[name]
        if array.dtype != info.type.dtype.numpy or array.shape != tuple(info.type.shape):
            raise error(f"{path}: parameter {name} should be {info.type}, found "
                        f"{array.dtype}{list(array.shape)}")
        values[name] = array
    return values
