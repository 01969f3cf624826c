"""Files from outside (graphc/files.py and the loaders built on it): crafted artifacts, checkpoints,
run folders and data files each give a clear exit-1 error naming the file, read within stated
bounds (a subprocess measures peak memory of the worst cases), and write nothing outside the
folder they are meant for."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from graphc import cli
from graphc.errors import GraphcError
from graphc.files import (
    MAX_JSON_DEPTH,
    ListOf,
    MapOf,
    Npz,
    check_schema,
    open_regular,
    parse_json,
    read_bytes,
)
from graphc.runtime import load_artifact
from graphc.runtime.checkpoint import load_checkpoint
from graphc.runtime.csv_data import read_csv
from graphc.runtime.data import IDX_IMAGES, IDX_LABELS, load_dataset, read_idx

MLP = REPO / "models" / "mnist_mlp.nn"
LOGREG = REPO / "models" / "digits_logreg.nn"
DEEP = "[" * 200_000 + "]" * 200_000
TiB = 1 << 40


# --- crafting -------------------------------------------------------------------------------------

def npy_header(dtype, shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def zeros_deflated(prefix: bytes, nbytes: int) -> tuple[bytes, int]:
    """Raw deflate data of `prefix` then `nbytes` zero bytes, made without compressing them all:
    after a full flush the compressor starts afresh, so one compressed 16 MiB block repeats."""
    block = 16 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    count = nbytes // block
    return head + again * count + c.flush(), len(prefix) + count * block


def write_zip(path: Path, members: list[tuple[str, int, bytes, int, int]]) -> None:
    """A zip file of (name, method, data as stored, uncompressed size, crc) members, written by
    hand so that sizes and contents may disagree with each other (a stored member's crc is
    computed; a deflated one's is taken as given, as its data is too large to checksum here)."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, method, data, size, crc in members:
        crc = zlib.crc32(data) if method == zipfile.ZIP_STORED else crc
        offset = out.tell()
        raw = name.encode()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data),
                              size, len(raw), 0) + raw + data)
        central.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc,
                                  len(data), size, len(raw), 0, 0, 0, 0, 0, offset) + raw)
    start = out.tell()
    out.write(central.getvalue())
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                          len(central.getvalue()), start, 0))
    path.write_bytes(out.getvalue())


def stored_members(npz_path: Path) -> list[tuple[str, int, bytes, int, int]]:
    with zipfile.ZipFile(npz_path) as z:
        return [(i.filename, zipfile.ZIP_STORED, z.read(i), i.file_size, i.CRC) for i in z.infolist()]


def resign(folder: Path, name: str) -> None:
    """Make the manifest's hash agree with `name` as it is now (as an attacker would)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def expect_error(fn, *fragments: str) -> str:
    with pytest.raises(GraphcError) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert len(message) < 2000, message[:300]
    return message


def cli_error(argv, capsys, *fragments: str) -> str:
    assert cli.main([str(a) for a in argv]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert len(err) < 2000, err[:300]
    return err


# crafted artifacts, built from a good one; each is a function of the folder
def extra_3gb_member(art: Path) -> None:
    members = stored_members(art / "params.npz")
    data, size = zeros_deflated(npy_header(np.float32, ((3 << 30) // 4,)), 3 << 30)
    members.append(("extra.npy", zipfile.ZIP_DEFLATED, data, size, 0))
    write_zip(art / "params.npz", members)
    resign(art, "params.npz")


def param_claims_1_5_tib(art: Path) -> None:
    members = stored_members(art / "params.npz")
    name, method, data, size, crc = members[0]
    header = npy_header(np.float32, (int(1.5 * TiB) // 4,))
    members[0] = (name, method, header + data[len(header):], size, crc)
    write_zip(art / "params.npz", members)
    resign(art, "params.npz")


def dev_zero(name: str):
    def craft(art: Path) -> None:
        (art / name).unlink()
        (art / name).symlink_to("/dev/zero")
    return craft


def fifo(name: str):
    def craft(art: Path) -> None:
        (art / name).unlink()
        os.mkfifo(art / name)
    return craft


def deep_graph(art: Path) -> None:
    (art / "graph.json").write_text(DEEP)
    resign(art, "graph.json")


def deep_manifest(art: Path) -> None:
    (art / "manifest.json").write_text(DEEP)


def huge_broadcast(size: int):
    def craft(art: Path) -> None:
        def add(doc):
            forward = doc["graphs"]["forward"]
            logits = forward["outputs"][0][1]
            forward["nodes"].append({"op": "broadcast_to", "inputs": [logits],
                                     "attrs": {"shape": [size, "N", 10]},
                                     "type": ["f32", [size, "N", 10]], "name": "big", "loc": None,
                                     "tags": []})
            forward["outputs"].append(["big", len(forward["nodes"]) - 1])
        edit_json(art / "graph.json", add)
        resign(art, "graph.json")
    return craft


ARTIFACT_CASES = {
    "extra 3 GB deflated member": (extra_3gb_member, "params.npz", "over the limit"),
    "parameter header claims 1.5 TiB": (param_claims_1_5_tib, "params.npz", "over the limit"),
    "graph.json links to /dev/zero": (dev_zero("graph.json"), "graph.json", "not a regular file"),
    "manifest.json links to /dev/zero": (dev_zero("manifest.json"), "manifest.json",
                                         "not a regular file"),
    "graph.json is a FIFO": (fifo("graph.json"), "graph.json", "not a regular file"),
    "200k-deep graph.json": (deep_graph, "graph.json", "nested deeper than"),
    "200k-deep manifest.json": (deep_manifest, "manifest.json", "nested deeper than"),
    # over the type system's bound on a tensor's elements: refused as the graph is rebuilt
    "broadcast_to [1e9, N, 10]": (huge_broadcast(10 ** 9), "graph.json", "is too large"),
    # within it, but 8 GB of values per sample: refused by the artifact's bound on a graph
    "broadcast_to [2e8, N, 10]": (huge_broadcast(2 * 10 ** 8), "graph.json",
                                  "bytes of buffers per sample"),
}


@pytest.fixture
def x_file(tmp_path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 784), np.float32))
    return path


# --- the shared readers -----------------------------------------------------------------------------

def test_only_regular_files_are_opened(tmp_path):
    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")               # opening it for reading would block: it must not
    for name in ("zero", "fifo"):
        expect_error(lambda name=name: open_regular(tmp_path / name), str(tmp_path / name),
                     "not a regular file")
    expect_error(lambda: open_regular(tmp_path), "not a regular file")
    expect_error(lambda: open_regular(tmp_path / "gone"), "no such file")
    (tmp_path / "ok").write_bytes(b"12345")
    (tmp_path / "link").symlink_to(tmp_path / "ok")      # a link to a regular file is fine
    assert read_bytes(tmp_path / "link", 5) == b"12345"
    expect_error(lambda: read_bytes(tmp_path / "ok", 4), "5 bytes, over the limit of 4")


def test_json_nesting_is_bounded_without_recursion_errors(tmp_path):
    path = tmp_path / "f.json"
    expect_error(lambda: parse_json(DEEP, path), str(path), "nested deeper than")
    expect_error(lambda: parse_json("[" * 150 + "]" * 150, path), "nested deeper than")
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(nested, path) is not None
    expect_error(lambda: parse_json("[" + nested + "]", path), "nested deeper than")
    expect_error(lambda: parse_json(b"\xff{}", path), "not UTF-8")
    expect_error(lambda: parse_json("{", path), "not valid JSON")


def test_schemas_name_the_place_and_refuse_unknown_keys(tmp_path):
    path = tmp_path / "c.json"
    spec = {"a": int, "b?": (str, type(None)), "c": MapOf(ListOf(float)), "d": {"e": bool}}
    good = {"a": 1, "c": {"k": [1, 2.5]}, "d": {"e": True}}
    check_schema(good, spec, path)
    for bad, fragment in [({**good, "z": 1}, "unknown key 'z' in the top level"),
                          ({**good, "a": True}, "a should be an integer, found true or false"),
                          ({**good, "a": "1"}, "a should be an integer, found a string"),
                          ({**good, "b": 3}, "b should be a string or null"),
                          ({**good, "c": {"k": [1, "x"]}}, "c.k[1] should be a number"),
                          ({**good, "d": {}}, "d lacks the key 'e'"),
                          ({k: v for k, v in good.items() if k != "a"}, "lacks the key 'a'"),
                          ([], "the top level should be an object, found a list")]:
        expect_error(lambda bad=bad: check_schema(bad, spec, path), str(path), fragment)


def test_npz_members_are_checked_before_they_are_read(tmp_path):
    path = tmp_path / "a.npz"
    huge = npy_header(np.float32, (int(1.5 * TiB) // 4,))
    write_zip(path, [("fine.npy", zipfile.ZIP_STORED, npy_header(np.int64, (2,)) + bytes(16),
                      len(npy_header(np.int64, (2,))) + 16, 0),
                     ("lies.npy", zipfile.ZIP_STORED, huge + bytes(8), len(huge) + 8, 0)])
    with Npz(None, path) as npz:
        expect_error(lambda: npz.read("lies", 1 << 30), "over the limit of 1,073,741,824")
        expect_error(lambda: npz.read("lies", 2 * TiB), "its header says 1,649,267,441,664 bytes")
        expect_error(lambda: npz.read("fine", 1 << 20, np.float32, (2,)),
                     "should be float32[2], found int64[2]")
        expect_error(lambda: npz.read("gone", 1 << 20), "array 'gone' is missing")
    np.savez(path, a=np.array([object()], dtype=object), b=np.arange(3.0))
    with Npz(None, path) as npz:
        expect_error(lambda: npz.read("a", 1 << 20), "holds Python objects", "refuses")
        assert npz.read("b", 1 << 20).tolist() == [0.0, 1.0, 2.0]
        assert npz.read("b", 1 << 20).flags.writeable


# --- artifacts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_crafted_artifacts_are_refused_clearly(case, art, x_file, tmp_path, capsys):
    craft, file, fragment = ARTIFACT_CASES[case]
    craft(art)
    out = tmp_path / "out.npz"
    cli_error(["run", art, "--input", f"x={x_file}", "-o", out], capsys, str(art / file), fragment)
    assert not out.exists()


def test_members_the_manifest_does_not_name_are_never_read(art, x_file, tmp_path, capsys):
    members = stored_members(art / "params.npz")
    header = npy_header(np.float32, (int(1.5 * TiB) // 4,))      # np.load would try to allocate it
    members.append(("unnamed.npy", zipfile.ZIP_STORED, header + bytes(64), len(header) + 64, 0))
    write_zip(art / "params.npz", members)
    resign(art, "params.npz")
    program = load_artifact(art)
    assert set(program.params) == {"W1", "b1", "W2", "b2"}


@pytest.mark.parametrize("model", ["../../../../tmp/graphc-escape", "/tmp/graphc-escape", "a/b", ""])
def test_a_model_name_never_becomes_a_path(model, art, tmp_path, monkeypatch, capsys):
    edit_json(art / "manifest.json", lambda m: m.update(model=model))
    work = tmp_path / "work" / "deep" / "er"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = set(Path("/tmp").glob("graphc-escape*"))
    cli_error(["train", art, "--quiet", "--epochs", 1], capsys, "'model' must be a name")
    assert set(Path("/tmp").glob("graphc-escape*")) == before
    assert not any((tmp_path / "work").rglob("runs"))


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a\\b", ".."])
def test_an_output_name_never_becomes_a_zip_member_name(name, art, x_file, tmp_path, capsys):
    edit_json(art / "graph.json",
              lambda doc: doc["graphs"]["forward"]["outputs"][0].__setitem__(0, name))
    resign(art, "graph.json")
    out = tmp_path / "out.npz"
    cli_error(["run", art, "--input", f"x={x_file}", "-o", out], capsys, "graph.json",
              "does not name a node by a name graphc makes")
    assert not out.exists()


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["task"]["features"].__setitem__(0, 1e308), "task.features[0] should be a string"),
    (lambda m: m["task"].update(output={}), "task.output should be a string"),
    (lambda m: m["task"]["labels"].__setitem__(0, "nope"), "task names input 'nope'"),
    (lambda m: m["task"].update(output="nope"), "task names output 'nope'"),
    (lambda m: m["train"].update(optimizer=1.5), "train.optimizer should be [name, {options}]"),
    (lambda m: m["train"]["optimizer"][1].update(lr=[1]), "learning rate is [1], not a number"),
    (lambda m: m["train"].pop("batch"), "train lacks the key 'batch'"),
    (lambda m: m["params"][0]["type"][1].__setitem__(0, -784), "bad dimension -784"),
])
def test_manifest_fields_the_runtime_reads_are_checked(edit, fragment, art, tmp_path, capsys):
    edit_json(art / "manifest.json", edit)
    cli_error(["train", art, "--quiet", "--out", tmp_path / "run"], capsys, "manifest.json"
              if "should be" in fragment or "lacks" in fragment else str(art), fragment)
    assert not (tmp_path / "run").exists()


def test_manifest_schema(art):
    edit_json(art / "manifest.json", lambda m: m.update(surprise=1))
    expect_error(lambda: load_artifact(art), "manifest.json", "unknown key 'surprise'")
    edit_json(art / "manifest.json", lambda m: (m.pop("surprise"), m.update(inputs=["x"])))
    expect_error(lambda: load_artifact(art), "manifest.json", "inputs should be an object")
    edit_json(art / "manifest.json", lambda m: m.update(inputs={"x": ["f32", ["N", 784]]},
                                                        params="W1"))
    expect_error(lambda: load_artifact(art), "manifest.json", "params should be a list")


# --- run folders and checkpoints ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["train", str(LOGREG), "--out", str(run), "--epochs", "1", "--quiet"]) == 0
    return run


@pytest.fixture
def run(pristine_run, tmp_path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(pristine_run, folder, symlinks=True)
    return folder


def rewrite_meta(checkpoint: Path, fn) -> None:
    with np.load(checkpoint, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(fn(meta))
    np.savez(checkpoint, **arrays)


RUN_CASES = {
    "200k-deep config.json": (lambda r: (r / "config.json").write_text(DEEP), "config.json",
                              "nested deeper than"),
    "settings is a string": (lambda r: edit_json(r / "config.json",
                                                 lambda c: c.update(settings="adam")),
                             "config.json", "settings should be an object, found a string"),
    "unknown config key": (lambda r: edit_json(r / "config.json", lambda c: c.update(extra=1)),
                           "config.json", "unknown key 'extra'"),
    "200k-deep loop state": (lambda r: rewrite_meta(r / "checkpoints" / "last.npz", lambda m: DEEP),
                             "last.npz", "nested deeper than"),
    "unknown key in the loop state": (
        lambda r: rewrite_meta(r / "checkpoints" / "last.npz",
                               lambda m: json.dumps({**m, "loop": {**m["loop"], "bogus": 1}})),
        "last.npz", "unknown key 'bogus' in loop"),
    "epoch is a string": (
        lambda r: rewrite_meta(r / "checkpoints" / "last.npz",
                               lambda m: json.dumps({**m, "loop": {**m["loop"], "epoch": "1"}})),
        "last.npz", "loop.epoch should be an integer"),
    "scaler statistics are not numbers": (
        lambda r: edit_json(r / "config.json", lambda c: c["data"]["scaler"]["mean"].__setitem__(3, "x")),
        "", "malformed input-scaling record"),
    "scaler mode is a list": (
        lambda r: edit_json(r / "config.json", lambda c: c["data"]["scaler"].update(mode=[])),
        "", "malformed input-scaling record"),
    "track_norms below 1": (lambda r: edit_json(r / "config.json", lambda c: c.update(track_norms=-1)),
                            "config.json", "track_norms must be at least 1"),
    "negative seed": (lambda r: edit_json(r / "config.json", lambda c: c["settings"].update(seed=-1)),
                      "", "malformed train settings"),
    "schedule state is partial": (
        lambda r: rewrite_meta(r / "checkpoints" / "last.npz",
                               lambda m: json.dumps({**m, "loop": {**m["loop"], "schedule": {"lr": 1}}})),
        "last.npz", "loop.schedule lacks the key 'epoch'"),
    "negative epoch": (
        lambda r: rewrite_meta(r / "checkpoints" / "last.npz",
                               lambda m: json.dumps({**m, "loop": {**m["loop"], "epoch": -1}})),
        "last.npz", "loop.epoch is -1, below 0"),
    "no loop state": (
        lambda r: rewrite_meta(r / "checkpoints" / "last.npz",
                               lambda m: json.dumps({k: v for k, v in m.items() if k != "loop"})),
        "last.npz", "no training loop state to resume"),
    "checkpoint links to /dev/zero": (
        lambda r: ((r / "checkpoints" / "last.npz").unlink(),
                   (r / "checkpoints" / "last.npz").symlink_to("/dev/zero")),
        "last.npz", "not a regular file"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_crafted_run_folders_are_refused_clearly(case, run, capsys):
    craft, file, fragment = RUN_CASES[case]
    craft(run)
    before = sorted(p.name for p in run.rglob("*"))
    cli_error(["train", "--resume", run, "--quiet", "--epochs", 2], capsys, file, fragment)
    assert sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize("part", ["checkpoints", "trained"])
def test_a_resumed_run_never_writes_through_a_symlinked_subfolder(part, run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / part, elsewhere)
    (run / part).symlink_to(elsewhere)
    before = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    cli_error(["train", "--resume", run, "--quiet", "--epochs", 2], capsys, str(run / part),
              "symbolic link")
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == before


def test_a_checkpoint_reads_only_what_its_program_declares(run):
    last = run / "checkpoints" / "last.npz"
    program = load_artifact(run / "model")
    members = stored_members(last)
    header = npy_header(np.float32, (int(1.5 * TiB) // 4,))      # np.load would try to allocate it
    members.append(("param/extra.npy", zipfile.ZIP_STORED, header + bytes(64), len(header) + 64, 0))
    write_zip(last, members)
    assert load_checkpoint(last, program)["loop"]["epoch"] == 1
    os.truncate(last, 1 << 30)                 # far more than its arrays and loop state can take
    expect_error(lambda: load_checkpoint(last, program), str(last), "over the limit")


# --- data files ---------------------------------------------------------------------------------------

def gzip_of(deflated: bytes) -> bytes:
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + deflated + bytes(8)


def test_idx_header_beyond_the_bound_is_refused_before_decompressing(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">4i", IDX_IMAGES, 100_000, 1000, 1000)))
    expect_error(lambda: read_idx(path, IDX_IMAGES), str(path), "over the limit")


def test_idx_gzip_bomb_stops_where_the_header_says(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    deflated, _ = zeros_deflated(struct.pack(">2i", IDX_LABELS, 10), 4 << 30)    # 4 GiB of zeros
    path.write_bytes(gzip_of(deflated))
    assert path.stat().st_size < 8 << 20
    start = time.perf_counter()
    expect_error(lambda: read_idx(path, IDX_LABELS), str(path),
                 "corrupt: the header says 10 labels (10 bytes) but the file holds more")
    assert time.perf_counter() - start < 5


def test_csv_bounds(tmp_path):
    sparse = tmp_path / "nul_tail.csv"
    sparse.write_text("a,y\n1,0\n")
    os.truncate(sparse, 1 << 30)               # 1 GiB: the rest reads as NUL bytes
    expect_error(lambda: read_csv(sparse, "y"), str(sparse), "over the limit of 268,435,456")
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"a,y\n1,0\n2,\x00\x00\n")
    expect_error(lambda: read_csv(nul, "y"), "NUL character at line 3, column 3")
    long_row = tmp_path / "long.csv"
    long_row.write_bytes(b"a,y\n" + b"9" * (17 << 20) + b",0\n")
    expect_error(lambda: read_csv(long_row, "y"), "line 2 is longer than 16,777,216 bytes")


def test_a_huge_cell_is_not_echoed(tmp_path):
    path = tmp_path / "cell.csv"
    path.write_text("a,y\n" + "x" * 5_000_000 + ",0\n")
    message = expect_error(lambda: read_csv(path, "y"), f"{path}:2:1", "is not a number")
    assert "x" * 100 not in message
    path.write_text("a,a" + "b" * 5_000_000 + ",y\n1,2,3\n")
    expect_error(lambda: read_csv(path, "z"), "no column named 'z'", "5,000,001 characters")


def test_the_csv_header_check_is_linear(tmp_path):
    path = tmp_path / "wide.csv"
    names = [f"c{i}" for i in range(40_000)] + ["y"]
    path.write_text(",".join(names) + "\n" + ",".join(["1"] * 40_000) + ",0\n")
    start = time.perf_counter()
    x, y, _ = read_csv(path, "y")
    assert x.shape == (1, 40_000) and y.tolist() == [0]
    assert time.perf_counter() - start < 3
    path.write_text(",".join(names + ["c39999"]) + "\n")
    expect_error(lambda: read_csv(path, "y"), f"{path}:1:", "column 'c39999' appears twice")


def test_npz_member_claiming_1_5_tib_is_refused(tmp_path):
    path = tmp_path / "d.npz"
    huge = npy_header(np.float32, (int(1.5 * TiB) // 4,))
    write_zip(path, [("x.npy", zipfile.ZIP_STORED, huge + bytes(64), len(huge) + 64, 0),
                     ("y.npy", zipfile.ZIP_STORED, npy_header(np.int64, (2,)) + bytes(16),
                      len(npy_header(np.int64, (2,))) + 16, 0)])
    expect_error(lambda: load_dataset(("npz", {"path": str(path)})), str(path), "array 'x'",
                 "over the limit")


@pytest.mark.parametrize("key", ["x", "x_test"])
@pytest.mark.parametrize("scale", ["none", "unit", "standardize"])
def test_nan_features_are_located_in_every_scale_mode(key, scale, tmp_path, capsys):
    x, x_test = np.ones((40, 64), np.float32), np.ones((10, 64), np.float32)
    {"x": x, "x_test": x_test}[key][7, 5] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 10, x_test=x_test, y_test=np.arange(10))
    model = tmp_path / "m.nn"
    model.write_text(LOGREG.read_text().replace("scale     = standardize",
                                                f'scale = {scale}\n    data = npz("d.npz")'))
    cli_error(["train", model, "--out", tmp_path / "run", "--quiet", "--epochs", 1], capsys,
              str(tmp_path / "d.npz"), f"array '{key}' holds nan at sample 7, feature 5")
    assert not (tmp_path / "run").exists()


def test_label_errors_name_the_sample(tmp_path, capsys):
    y = np.arange(40) % 10
    y[23] = 12
    np.savez(tmp_path / "d.npz", x=np.ones((40, 64), np.float32), y=y)
    model = tmp_path / "m.nn"
    model.write_text(LOGREG.read_text().replace("scale     = standardize", 'data = npz("d.npz")'))
    cli_error(["train", model, "--out", tmp_path / "run", "--quiet"], capsys,
              str(tmp_path / "d.npz"), "sample 23 (counting from 0) has class index 12")


# --- memory: the worst cases in a child process -------------------------------------------------------

def test_worst_cases_stay_within_bounded_memory(pristine, tmp_path):
    """Each worst case fails with exit 1 in one child process whose peak RSS stays far below
    what reading the files whole would take (3 GB, 4 GB, 1.5 TiB)."""
    arts = {}
    for case in ("extra 3 GB deflated member", "parameter header claims 1.5 TiB",
                 "graph.json links to /dev/zero", "graph.json is a FIFO",
                 "broadcast_to [1e9, N, 10]", "broadcast_to [2e8, N, 10]"):
        arts[case] = tmp_path / f"art{len(arts)}"
        shutil.copytree(pristine, arts[case])
        ARTIFACT_CASES[case][0](arts[case])
    np.save(tmp_path / "x.npy", np.zeros((2, 784), np.float32))
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    deflated, _ = zeros_deflated(struct.pack(">4i", IDX_IMAGES, 10, 28, 28), 4 << 30)
    (bomb / "train-images-idx3-ubyte.gz").write_bytes(gzip_of(deflated))
    for stem in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (bomb / f"{stem}.gz").write_bytes(b"")
    cell = tmp_path / "cell.csv"
    with open(cell, "wb") as f:
        f.write(b"a,y\n")
        for _ in range(25):
            f.write(b"7" * (8 << 20))           # a 200 MB cell
        f.write(b",0\n")
    calls = [["run", str(art), "--input", f"x={tmp_path / 'x.npy'}", "-o",
              str(tmp_path / "out.npz")] for art in arts.values()]
    script = textwrap.dedent(f"""
        import contextlib, io, json, resource, sys
        from graphc import cli
        from graphc.errors import GraphcError
        from graphc.runtime.data import IDX_IMAGES, read_idx
        from graphc.runtime.csv_data import read_csv
        codes = []
        for argv in {calls!r}:
            with contextlib.redirect_stderr(io.StringIO()):
                codes.append(cli.main(argv))
        for load in (lambda: read_idx({str(bomb / 'train-images-idx3-ubyte.gz')!r}, IDX_IMAGES),
                     lambda: read_csv(__import__('pathlib').Path({str(cell)!r}), "y")):
            try:
                load()
                codes.append(0)
            except GraphcError:
                codes.append(1)
        # VmHWM: this process's own peak; ru_maxrss also counts the parent's pages it was
        # forked (or vforked) with, which in a long test session can be gigabytes
        try:
            status = open("/proc/self/status").read()
            peak_kb = int(status.split("VmHWM:")[1].split()[0])
        except (OSError, IndexError):
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"codes": codes, "rss_mb": peak_kb / 1024}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    print(f"worst cases: {result}")
    assert result["codes"] == [1] * (len(calls) + 2), result
    assert result["rss_mb"] < 500, result
    assert not (tmp_path / "out.npz").exists()


def test_input_arrays_of_graphc_run_are_checked_before_they_are_read(pristine, tmp_path, capsys):
    huge = npy_header(np.float32, (int(1.5 * TiB) // 4, 784))
    npy = tmp_path / "x.npy"
    npy.write_bytes(huge + bytes(64))
    cli_error(["run", pristine, "--input", f"x={npy}"], capsys, str(npy), "over the limit")
    npy.write_bytes(npy_header(np.float32, (2, 784)) + bytes(64))
    cli_error(["run", pristine, "--input", f"x={npy}"], capsys, str(npy),
              "its header says 6,272 bytes of data, the file holds 64")
    npz = tmp_path / "in.npz"
    write_zip(npz, [("x.npy", zipfile.ZIP_STORED, huge + bytes(64), len(huge) + 64, 0)])
    cli_error(["run", pristine, "--input", npz], capsys, str(npz), "array 'x'", "over the limit")
