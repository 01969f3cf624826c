"""Artifacts: save/load round trips, clean errors for every kind of damage, safety against files
that try to run code, atomic saves, and `graphc run` on the command line."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
from conftest import LARGE_MODELS

import graphc
from graphc import cli
from graphc import files as files_mod
from graphc.errors import GraphcError
from graphc.runtime import load_artifact

ROOT = Path(__file__).resolve().parent.parent
MODELS = [m for m in sorted((ROOT / "models").glob("*.nn")) if m.stem not in LARGE_MODELS]  # (conftest)
MLP = ROOT / "models" / "mnist_mlp.nn"


# --- helpers ----------------------------------------------------------------------------------------

def sample_inputs(program, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays matching the program's inputs, symbolic dimensions set to `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, ttype in program.inputs.items():
        shape = tuple(batch if isinstance(d, str) else d for d in ttype.shape)
        dtype = ttype.dtype.numpy
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[name] = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
    return feeds


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fix_hash(folder: Path, name: str) -> None:
    """Make the manifest agree with the current contents of `name`, so the hash check passes."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def edit_graph(folder: Path, fn, fix: bool = True) -> None:
    doc = json.loads((folder / "graph.json").read_text())
    result = fn(doc)
    doc = doc if result is None else result
    (folder / "graph.json").write_text(json.dumps(doc, indent=1))
    if fix:
        fix_hash(folder, "graph.json")


def edit_manifest(folder: Path, fn) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    result = fn(manifest)
    manifest = manifest if result is None else result
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def forward_nodes(doc: dict) -> list[dict]:
    return doc["graphs"]["forward"]["nodes"]


def node_index(doc: dict, op: str, nth: int = 0) -> int:
    hits = [i for i, n in enumerate(forward_nodes(doc)) if n["op"] == op]
    assert len(hits) > nth, f"no {op} node #{nth} in the graph"
    return hits[nth]


def expect_load_error(folder: Path, *fragments: str) -> GraphcError:
    with pytest.raises(GraphcError) as info:
        load_artifact(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in message
    return info.value


@pytest.fixture(scope="module")
def mlp_program():
    return graphc.compile_file(MLP)


# --- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
def test_round_trip(model, tmp_path):
    program = graphc.compile_file(model)
    feeds = sample_inputs(program)
    before = program.forward(**feeds)
    folder = tmp_path / model.stem
    program.save(folder)
    loaded = load_artifact(folder)

    assert loaded.name == program.name
    assert loaded.inputs == program.inputs
    assert loaded.outputs == program.outputs
    assert set(loaded.params) == set(program.params)
    for name in program.params:
        assert loaded.params[name].dtype == program.params[name].dtype, name
        np.testing.assert_array_equal(loaded.params[name], program.params[name], err_msg=name)
    assert {k: (v.type, v.role, v.init) for k, v in loaded.param_info.items()} == \
           {k: (v.type, v.role, v.init) for k, v in program.param_info.items()}

    after = loaded.forward(**feeds)
    assert set(after) == set(before)
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "graphc-artifact"
    assert manifest["version"] == 1
    assert manifest["model"] == program.name
    assert set(manifest["files"]) == {"graph.json", "params.npz"}
    for name, digest in manifest["files"].items():
        assert digest == sha256(folder / name), name
    assert sorted(p.name for p in folder.iterdir()) == ["graph.json", "manifest.json", "params.npz"]


def test_round_trip_keeps_edited_params(mlp_program, tmp_path):
    program = graphc.compile_file(MLP)
    program.params["b2"] = np.arange(10, dtype=np.float32)
    program.save(tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    np.testing.assert_array_equal(loaded.params["b2"], np.arange(10, dtype=np.float32))
    feeds = sample_inputs(program)
    np.testing.assert_array_equal(loaded.forward(**feeds)["logp"], program.forward(**feeds)["logp"])


def test_loaded_artifact_saves_again_identically(pristine, tmp_path):
    load_artifact(pristine).save(tmp_path / "again")
    for name in ("graph.json", "params.npz"):
        assert sha256(tmp_path / "again" / name) == sha256(pristine / name), name


def test_graphc_load_artifact_alias(pristine):
    assert graphc.load_artifact is load_artifact
    assert graphc.load_artifact(pristine).name == "mnist_mlp"


# --- atomic saves -----------------------------------------------------------------------------------

def test_save_leaves_no_temporary_files(mlp_program, tmp_path):
    folder = tmp_path / "a"
    mlp_program.save(folder)
    mlp_program.save(folder)     # overwriting an artifact too
    assert sorted(p.name for p in folder.iterdir()) == ["graph.json", "manifest.json", "params.npz"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_old_artifact_and_no_temporary_files(tmp_path, monkeypatch):
    program = graphc.compile_file(MLP)
    folder = tmp_path / "a"
    program.save(folder)
    old_b2 = program.params["b2"].copy()
    program.params["b2"] = np.full(10, 7.0, dtype=np.float32)

    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if Path(dst).name == "params.npz":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(files_mod.os, "replace", failing_replace)
    with pytest.raises(OSError):
        program.save(folder)
    monkeypatch.undo()

    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    loaded = load_artifact(folder)       # the previous artifact is intact
    np.testing.assert_array_equal(loaded.params["b2"], old_b2)


# --- load errors are GraphcErrors ------------------------------------------------------------------

def test_missing_folder(tmp_path):
    expect_load_error(tmp_path / "nope", "nope")


def test_folder_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    expect_load_error(tmp_path / "f")


def test_missing_manifest(art):
    (art / "manifest.json").unlink()
    expect_load_error(art, "manifest.json")


@pytest.mark.parametrize("name", ["graph.json", "params.npz"])
def test_missing_data_file(art, name):
    (art / name).unlink()
    expect_load_error(art, name)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage", "[1, 2, 3]", "null",
                                  '{"format": "something-else", "version": 1}'])
def test_corrupt_manifest(art, text):
    (art / "manifest.json").write_bytes(text.encode("latin-1"))
    expect_load_error(art, "manifest.json")


def test_corrupt_graph_json_with_matching_hash(art):
    (art / "graph.json").write_text("{this is not json")
    fix_hash(art, "graph.json")
    expect_load_error(art)


def test_tampered_graph_json(art):
    edit_graph(art, lambda d: forward_nodes(d)[node_index(d, "relu")].update(op="tanh"), fix=False)
    expect_load_error(art, "graph.json", "do not match")


def test_tampered_params(art):
    data = bytearray((art / "params.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / "params.npz").write_bytes(bytes(data))
    expect_load_error(art, "params.npz", "do not match")


def test_truncated_params_with_matching_hash(art):
    data = (art / "params.npz").read_bytes()
    (art / "params.npz").write_bytes(data[: len(data) // 3])
    fix_hash(art, "params.npz")
    expect_load_error(art, "params.npz")


def test_params_of_the_wrong_shape(art):
    with np.load(art / "params.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["b1"] = np.zeros(3, dtype=np.float32)
    np.savez(art / "params.npz", **arrays)
    fix_hash(art, "params.npz")
    expect_load_error(art, "b1")


def test_missing_param_array(art):
    with np.load(art / "params.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "W2"}
    np.savez(art / "params.npz", **arrays)
    fix_hash(art, "params.npz")
    expect_load_error(art, "W2")


def test_unknown_op(art):
    edit_graph(art, lambda d: forward_nodes(d)[node_index(d, "relu")].update(op="frobnicate"))
    expect_load_error(art, "graph.json", "unknown op", "frobnicate")


def test_unknown_attribute(art):
    edit_graph(art, lambda d: forward_nodes(d)[node_index(d, "relu")]["attrs"].update(alpha=2))
    expect_load_error(art, "graph.json", "alpha")


def test_recorded_type_disagrees_with_rules(art):
    def edit(doc):
        node = forward_nodes(doc)[node_index(doc, "relu")]
        node["type"] = [node["type"][0], ["N", 257]]
    edit_graph(art, edit)
    expect_load_error(art, "graph.json", "recorded as")


def test_recorded_dtype_disagrees_with_rules(art):
    edit_graph(art, lambda d: forward_nodes(d)[node_index(d, "relu")].update(
        type=["f64", ["N", 256]]))
    expect_load_error(art, "graph.json", "recorded as")


def test_wrong_arity(art):
    def edit(doc):
        node = forward_nodes(doc)[node_index(doc, "relu")]
        node["inputs"] = node["inputs"] + node["inputs"]
    edit_graph(art, edit)
    expect_load_error(art, "graph.json")


@pytest.mark.parametrize("ref", ["later", "self", -1, "str", 1.5, True])
def test_input_reference_must_name_an_earlier_node(art, ref):
    def edit(doc):
        i = node_index(doc, "relu")
        node = forward_nodes(doc)[i]
        node["inputs"] = [{"later": i + 1, "self": i, "str": "0"}.get(ref, ref)]
    edit_graph(art, edit)
    expect_load_error(art, "graph.json")


def test_source_node_with_inputs(art):
    edit_graph(art, lambda d: forward_nodes(d)[node_index(d, "param")].update(inputs=[0]))
    expect_load_error(art, "graph.json", "no inputs")


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5])
def test_wrong_artifact_version(art, version):
    edit_manifest(art, lambda m: m.update(version=version))
    expect_load_error(art, "version")


def test_missing_artifact_version(art):
    edit_manifest(art, lambda m: m.pop("version") and None)
    expect_load_error(art, "version")


@pytest.mark.parametrize("version", [0, 2])
def test_wrong_graph_version(art, version):
    edit_graph(art, lambda d: d.update(version=version))
    expect_load_error(art)


def test_unknown_dtype(art):
    edit_manifest(art, lambda m: m["params"][0].update(type=["f128", [784, 256]]))
    expect_load_error(art, "f128")


# --- malformed artifacts that load far enough to need cross-checks ------------------------------

def test_graph_json_without_forward_graph(art):
    edit_graph(art, lambda d: {**d, "graphs": {"fwd": d["graphs"]["forward"]}})
    expect_load_error(art, "forward")


def test_manifest_without_model(art):
    edit_manifest(art, lambda m: m.pop("model") and None)
    expect_load_error(art, "model")


def test_manifest_files_not_an_object(art):
    edit_manifest(art, lambda m: m.update(files=[]))
    expect_load_error(art, "manifest")


def test_composite_op_in_graph(art):
    def edit(doc):
        nodes = forward_nodes(doc)
        add = node_index(doc, "add", 1)
        nodes.append({"op": "log_softmax", "inputs": [add], "attrs": {"axis": 1},
                      "type": ["f32", ["N", 10]], "name": "logp", "loc": None, "tags": []})
        doc["graphs"]["forward"]["outputs"] = [["logp", len(nodes) - 1]]
    edit_graph(art, edit)
    expect_load_error(art, "log_softmax")


def test_bf16_param_in_manifest(art):
    edit_manifest(art, lambda m: m["params"][1].update(type=["bf16", [256]]))
    expect_load_error(art, "bf16")


def test_param_node_naming_unknown_parameter(art):
    edit_graph(art, lambda d: forward_nodes(d)[node_index(d, "param")]["attrs"].update(name="Wx"))
    with pytest.raises(GraphcError):
        program = load_artifact(art)
        program.forward(x=np.zeros((2, 784), np.float32))


@pytest.mark.parametrize("attr, value", [("axis", 1.0), ("keepdims", "yes")])
def test_attribute_of_the_wrong_kind(art, attr, value):
    edit_graph(art, lambda d: forward_nodes(d)[node_index(d, "max")]["attrs"].update({attr: value}))
    with pytest.raises(GraphcError):
        program = load_artifact(art)
        program.forward(x=np.zeros((2, 784), np.float32))


# --- safety: loading never runs code from the files ------------------------------------------------

class _TouchOnUnpickle:
    """Unpickling this creates a file: proof that pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _object_array(marker: Path) -> np.ndarray:
    array = np.empty(1, dtype=object)
    array[0] = _TouchOnUnpickle(marker)
    return array


def test_payload_is_live(tmp_path):
    """The test below means something: unpickling the planted array does create the marker."""
    marker = tmp_path / "MARKER_live"
    buf = io.BytesIO()
    np.savez(buf, W1=_object_array(marker))
    buf.seek(0)
    with np.load(buf, allow_pickle=True) as npz:
        npz["W1"]
    assert marker.exists()


def test_pickled_object_array_in_params_is_refused(art, tmp_path):
    marker = tmp_path / "MARKER"
    with np.load(art / "params.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    for name in arrays:   # every parameter is a payload, whichever is read first
        arrays[name] = _object_array(marker)
    np.savez(art / "params.npz", **arrays)
    fix_hash(art, "params.npz")
    expect_load_error(art, "params.npz")
    assert not marker.exists()


def test_raw_pickle_as_params_is_refused(art, tmp_path):
    import pickle
    marker = tmp_path / "MARKER"
    (art / "params.npz").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    fix_hash(art, "params.npz")
    expect_load_error(art, "params.npz")
    assert not marker.exists()


def test_pickled_npy_member_is_refused(art, tmp_path):
    """An .npz member whose .npy header declares an object dtype."""
    import zipfile
    marker = tmp_path / "MARKER"
    with np.load(art / "params.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    with zipfile.ZipFile(art / "params.npz", "w") as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.save(buf, _object_array(marker) if name == "b2" else value, allow_pickle=True)
            zf.writestr(f"{name}.npy", buf.getvalue())
    fix_hash(art, "params.npz")
    expect_load_error(art, "params.npz")
    assert not marker.exists()


def _code(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def _graph_injection(where: str, code: str):
    def edit(doc):
        nodes = forward_nodes(doc)
        relu = nodes[node_index(doc, "relu")]
        if where == "op":
            relu["op"] = code
        elif where == "attr value":
            nodes[node_index(doc, "max")]["attrs"]["axis"] = code
        elif where == "attr key":
            relu["attrs"][code] = 1
        elif where == "node name":
            relu["name"] = code
        elif where == "tags":
            relu["tags"] = [code]
        elif where == "loc":
            relu["loc"] = [code, 1, 1, 1, 2]
        elif where == "type dtype":
            relu["type"] = [code, ["N", 256]]
        elif where == "type dim":
            relu["type"] = ["f32", [code, 256]]
        elif where == "input name":
            nodes[node_index(doc, "input")]["attrs"]["name"] = code
        elif where == "graph name":
            doc["graphs"]["forward"]["name"] = code
        elif where == "output name":
            doc["graphs"]["forward"]["outputs"][0][0] = code
        elif where == "const value":
            nodes.append({"op": "const", "inputs": [], "attrs": {"value": code},
                          "type": ["f32", []], "name": None, "loc": None, "tags": []})
        elif where == "graph format":
            doc["format"] = code
        else:
            raise AssertionError(where)
    return edit


def _load_and_run(folder: Path) -> None:
    """Load, run and print; each step may refuse with a GraphcError (or, for inputs it no longer
    has, a ProgramError), but nothing else may happen."""
    try:
        program = load_artifact(folder)
    except GraphcError:
        return
    repr(program)
    try:
        out = program.forward(x=np.zeros((2, 784), np.float32))
    except (GraphcError, ValueError) as err:    # ProgramError is a ValueError
        assert isinstance(err, GraphcError) or type(err).__name__ == "ProgramError", err
        return
    assert all(isinstance(v, np.ndarray) for v in out.values())


@pytest.mark.parametrize("where", ["op", "attr value", "attr key", "node name", "tags", "loc",
                                   "type dtype", "type dim", "input name", "graph name",
                                   "output name", "const value", "graph format"])
def test_code_in_graph_json_is_never_run(art, tmp_path, where):
    marker = tmp_path / "MARKER"
    edit_graph(art, _graph_injection(where, _code(marker)))
    _load_and_run(art)
    assert not marker.exists()


def test_code_as_op_name_is_an_unknown_op(art, tmp_path):
    marker = tmp_path / "MARKER"
    edit_graph(art, _graph_injection("op", _code(marker)))
    expect_load_error(art, "unknown op")
    assert not marker.exists()


@pytest.mark.parametrize("field", ["model", "backend", "init", "role", "graphc_version", "source"])
def test_code_in_manifest_is_never_run(art, tmp_path, field):
    marker = tmp_path / "MARKER"
    code = _code(marker)

    def edit(m):
        if field in ("init", "role"):
            m["params"][0][field] = [code, []] if field == "init" else code
        else:
            m[field] = code
    edit_manifest(art, edit)
    _load_and_run(art)
    assert not marker.exists()


def test_code_as_param_name_is_refused(art, tmp_path):
    marker = tmp_path / "MARKER"
    try:
        edit_graph(art, lambda d: forward_nodes(d)[node_index(d, "param")]["attrs"].update(
            name=_code(marker)))
        _load_and_run(art)
    finally:
        assert not marker.exists()


# --- graphc run --------------------------------------------------------------------------------------

@pytest.fixture
def x_file(tmp_path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(1).standard_normal((4, 784)).astype(np.float32))
    return path


def test_cli_run_prints_outputs(pristine, x_file, capsys):
    assert cli.main(["run", str(pristine), "--input", f"x={x_file}"]) == 0
    out = capsys.readouterr().out
    assert "logp" in out
    assert "float32[4, 10]" in out


def test_cli_run_writes_outputs(pristine, x_file, tmp_path, capsys):
    out_file = tmp_path / "out.npz"
    assert cli.main(["run", str(pristine), "--input", f"x={x_file}", "-o", str(out_file)]) == 0
    assert "logp" in capsys.readouterr().out
    want = load_artifact(pristine).forward(x=np.load(x_file))
    with np.load(out_file) as npz:
        assert sorted(npz.files) == ["logp"]
        np.testing.assert_array_equal(npz["logp"], want["logp"])


def test_cli_run_npz_inputs(pristine, x_file, tmp_path, capsys):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.load(x_file))
    assert cli.main(["run", str(pristine), "--input", str(inputs)]) == 0
    assert "float32[4, 10]" in capsys.readouterr().out


def _cli_error(argv, capsys) -> str:
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "internal error" not in captured.err
    return captured.err


def test_cli_run_missing_input_file(pristine, tmp_path, capsys):
    missing = tmp_path / "nothere.npy"
    err = _cli_error(["run", str(pristine), "--input", f"x={missing}"], capsys)
    assert str(missing) in err


def test_cli_run_input_not_an_array_file(pristine, tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    bad.write_text("hello")
    err = _cli_error(["run", str(pristine), "--input", f"x={bad}"], capsys)
    assert str(bad) in err


def test_cli_run_pickled_input_is_refused(pristine, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    bad = tmp_path / "evil.npy"
    np.save(bad, _object_array(marker), allow_pickle=True)
    _cli_error(["run", str(pristine), "--input", f"x={bad}"], capsys)
    assert not marker.exists()


def test_cli_run_wrong_input_shape(pristine, tmp_path, capsys):
    bad = tmp_path / "x.npy"
    np.save(bad, np.zeros((4, 783), np.float32))
    err = _cli_error(["run", str(pristine), "--input", f"x={bad}"], capsys)
    assert "x" in err and "784" in err and "783" in err


def test_cli_run_wrong_input_name(pristine, x_file, capsys):
    err = _cli_error(["run", str(pristine), "--input", f"q={x_file}"], capsys)
    assert "q" in err


def test_cli_run_broken_artifact(art, x_file, capsys):
    (art / "manifest.json").write_text("{")
    err = _cli_error(["run", str(art), "--input", f"x={x_file}"], capsys)
    assert "manifest.json" in err


def test_saved_files_follow_the_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        graphc.compile_file(ROOT / "models" / "backprop_example.nn").save(tmp_path / "a")
    finally:
        os.umask(old)
    for f in (tmp_path / "a").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
