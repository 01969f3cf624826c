"""graphc.runtime.data: loading MNIST-style IDX files, digits, .npz and CSV (and every way they go
wrong), splits, input scaling, fitting data to a model's inputs, and minibatch order."""
from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from graphc.errors import GraphcError
from graphc.ir.types import DType, TensorType
from graphc.runtime.data import (
    IDX_IMAGES,
    IDX_LABELS,
    Dataset,
    Scaler,
    batches,
    fit_inputs,
    load_dataset,
    read_idx,
    split,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# label counts published with the data sets (../shared/data/README.md)
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array: np.ndarray, magic: int | None = None, count: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else IDX_IMAGES if array.ndim == 3 else IDX_LABELS
    dims = (count if count is not None else array.shape[0],) + array.shape[1:]
    return struct.pack(f">i{len(dims)}i", magic, *dims) + array.tobytes()


def write_idx_set(folder: Path, n_train=6, n_test=4, gz=True, seed=0) -> dict[str, np.ndarray]:
    """The four IDX files of a tiny MNIST-like data set; returns what they hold."""
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def message(excinfo) -> str:
    return str(excinfo.value)


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("GRAPHC_DATA", raising=False)


# --- real MNIST and Fashion-MNIST ----------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist() -> Dataset:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"no MNIST files in {SHARED_DATA / 'mnist'}")
    return load_dataset(("mnist", {}), data_dir=str(SHARED_DATA / "mnist"))   # the folder itself


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"no Fashion-MNIST files in {SHARED_DATA / 'fashion-mnist'}")
    with pytest.MonkeyPatch.context() as mp:        # GRAPHC_DATA names the parent folder
        mp.setenv("GRAPHC_DATA", str(SHARED_DATA))
        return load_dataset(("fashion_mnist", {}))


def test_mnist_loads_with_the_published_shapes_and_label_counts(mnist):
    assert mnist.name == "mnist" and mnist.classes is None
    assert mnist.x_train.shape == (60000, 28, 28) and mnist.x_train.dtype == np.uint8
    assert mnist.x_test.shape == (10000, 28, 28) and mnist.x_test.dtype == np.uint8
    assert mnist.y_train.shape == (60000,) and mnist.y_train.dtype == np.int64
    assert mnist.y_test.shape == (10000,) and mnist.y_test.dtype == np.int64
    assert np.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.y_test).tolist() == MNIST_TEST_COUNTS
    assert mnist.x_train.mean() == pytest.approx(33.318, abs=1e-3)
    assert mnist.x_train.min() == 0 and mnist.x_train.max() == 255
    assert mnist.y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]   # the well-known first digits
    assert Path(mnist.source) == SHARED_DATA / "mnist"
    assert mnist.x_train.flags.writeable


def test_fashion_mnist_loads_from_the_parent_folder_named_by_GRAPHC_DATA(fashion):
    assert fashion.name == "fashion_mnist"
    assert fashion.x_train.shape == (60000, 28, 28) and fashion.x_test.shape == (10000, 28, 28)
    assert np.bincount(fashion.y_train).tolist() == [6000] * 10
    assert np.bincount(fashion.y_test).tolist() == [1000] * 10
    assert fashion.x_train.mean() == pytest.approx(72.940, abs=1e-3)
    assert Path(fashion.source) == SHARED_DATA / "fashion-mnist"


def test_unit_scaling_of_mnist_is_division_by_255(mnist):
    scaler = Scaler.fit("unit", mnist.x_train)
    assert (scaler.low, scaler.high) == (0.0, 255.0)
    out = scaler.apply(mnist.x_test[:500])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, mnist.x_test[:500].astype(np.float32) / np.float32(255))


def test_mnist_images_fit_a_flat_input(mnist):
    x, y = fit_inputs(mnist.x_test[:100], mnist.y_test[:100], TensorType(DType.f32, ("N", 784)),
                      TensorType(DType.i64, ("N",)), "mnist")
    assert x.shape == (100, 784) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x[3], mnist.x_test[3].reshape(-1))


# --- folder resolution (tiny synthetic IDX files) ------------------------------------------------

def test_idx_files_round_trip_gzipped_or_not(tmp_path):
    arrays = write_idx_set(tmp_path / "gz")
    write_idx_set(tmp_path / "raw", gz=False)
    for folder in ("gz", "raw"):
        ds = load_dataset(("mnist", {}), data_dir=str(tmp_path / folder))
        np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"])
        np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
        np.testing.assert_array_equal(ds.x_test, arrays["t10k-images-idx3-ubyte"])
        np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("name, sub", [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist"),
                                       ("fashion_mnist", "fashion_mnist")])
def test_a_parent_folder_with_a_subfolder_named_after_the_data_set(tmp_path, monkeypatch, name, sub):
    arrays = write_idx_set(tmp_path / sub)
    ds = load_dataset((name, {}), data_dir=str(tmp_path))
    assert Path(ds.source) == tmp_path / sub
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    monkeypatch.setenv("GRAPHC_DATA", str(tmp_path))
    assert Path(load_dataset((name, {})).source) == tmp_path / sub


def test_data_dir_wins_over_GRAPHC_DATA(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "a", n_train=3)
    write_idx_set(tmp_path / "b", n_train=5)
    monkeypatch.setenv("GRAPHC_DATA", str(tmp_path / "a"))
    assert len(load_dataset(("mnist", {}), data_dir=str(tmp_path / "b")).x_train) == 5
    assert len(load_dataset(("mnist", {})).x_train) == 3


def test_no_data_folder_at_all_says_how_to_give_one():
    with pytest.raises(GraphcError) as e:
        load_dataset(("mnist", {}))
    assert "no data folder given" in message(e) and "train-images-idx3-ubyte.gz" in message(e)
    assert "--data-dir" in message(e) and "GRAPHC_DATA" in message(e)


def test_missing_files_list_what_was_looked_for_and_where(tmp_path):
    with pytest.raises(GraphcError) as e:
        load_dataset(("fashion_mnist", {}), data_dir=str(tmp_path))
    text = message(e)
    assert all(f"{stem}.gz" in text for stem in IDX_NAMES)
    for folder in (tmp_path, tmp_path / "fashion-mnist", tmp_path / "fashion_mnist"):
        assert str(folder) in text
    assert "hint:" in text and "--data-dir" in text and "GRAPHC_DATA" in text


def test_a_folder_with_some_files_names_the_missing_one(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(GraphcError) as e:
        load_dataset(("mnist", {}), data_dir=str(tmp_path))
    assert "t10k-labels-idx1-ubyte.gz" in message(e)
    assert "train-images-idx3-ubyte" not in message(e)


def test_a_data_folder_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(GraphcError) as e:
        load_dataset(("mnist", {}))
    assert f"{tmp_path / 'nowhere'} (from GRAPHC_DATA) does not exist" in message(e)


# --- malformed IDX files -------------------------------------------------------------------------

def test_label_magic_in_the_images_file_is_refused(tmp_path):
    write_idx_set(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros(6), magic=IDX_LABELS)))
    with pytest.raises(GraphcError) as e:
        load_dataset(("mnist", {}), data_dir=str(tmp_path))
    assert message(e).startswith(f"{bad}: error: not an IDX image file (magic number 0x00000801, "
                                 f"expected 0x00000803)")
    assert "swapped" in message(e)


def test_a_truncated_file_says_what_the_header_promised(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28)))[:16 + 1000])
    with pytest.raises(GraphcError) as e:
        read_idx(path, IDX_IMAGES)
    assert message(e).startswith(f"{path}: error: truncated: the header says 3 images of 28x28 "
                                 f"(2352 bytes) but the file holds 1000 bytes")


def test_a_file_shorter_than_its_header(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(GraphcError, match="too short for an IDX label file: 3 bytes"):
        read_idx(path, IDX_LABELS)


def test_corrupt_gzip_is_reported_not_raised_raw(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])           # the stream is cut short
    with pytest.raises(GraphcError) as e:
        load_dataset(("mnist", {}), data_dir=str(tmp_path))
    assert message(e).startswith(f"{path}: error: corrupt gzip data")
    assert "fetch the file again" in message(e)
    garbled = bytearray(gzip.compress(idx_bytes(np.zeros(6))))
    garbled[12:20] = b"\xff" * 8                        # damaged deflate data
    path.write_bytes(bytes(garbled))
    with pytest.raises(GraphcError, match="corrupt gzip data"):
        read_idx(path, IDX_LABELS)


def test_a_gz_name_on_an_uncompressed_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros(6)))
    with pytest.raises(GraphcError, match=r"not a gzip file \(it starts with bytes 00 00 08 01"):
        read_idx(path, IDX_LABELS)


def test_image_and_label_counts_must_agree(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    with pytest.raises(GraphcError) as e:
        load_dataset(("mnist", {}), data_dir=str(tmp_path))
    assert "holds 4 images but t10k-labels-idx1-ubyte.gz holds 3 labels" in message(e)
    assert message(e).startswith(str(tmp_path / "t10k-images-idx3-ubyte.gz"))


# --- digits ----------------------------------------------------------------------------------------

def test_digits():
    pytest.importorskip("sklearn")
    ds = load_dataset(("digits", {}))
    assert ds.x_train.shape == (1797, 64) and ds.x_train.dtype.kind == "f"
    assert ds.x_train.min() == 0 and ds.x_train.max() == 16
    assert ds.y_train.dtype == np.int64 and sorted(set(ds.y_train.tolist())) == list(range(10))
    assert ds.x_test is None and ds.y_test is None
    parts = split(ds, 0.2, 0.2, seed=0)
    assert [len(parts[k][0]) for k in ("train", "val", "test")] == [1079, 359, 359]
    assert Scaler.fit("unit", ds.x_train).high == 16.0


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)            # makes the import fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(GraphcError) as e:
        load_dataset(("digits", {}))
    assert "scikit-learn" in message(e) and "pip install -e '.[digits]'" in message(e)


def test_unknown_data_sets_and_options():
    with pytest.raises(GraphcError, match="did you mean 'mnist'"):
        load_dataset(("mnsit", {}))
    with pytest.raises(GraphcError, match="option 'label' is missing"):
        load_dataset(("csv", {"path": "a.csv"}))
    with pytest.raises(GraphcError, match="unknown option 'path'"):
        load_dataset(("mnist", {"path": "x"}))


# --- .npz ------------------------------------------------------------------------------------------

def test_npz_with_its_own_test_split_resolves_against_base_dir(tmp_path):
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(np.int32), x_test=x[:4], y_test=y[:4])
    ds = load_dataset(("npz", {"path": "d.npz"}), base_dir=tmp_path)
    np.testing.assert_array_equal(ds.x_train, x)
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == y.tolist()
    assert ds.x_test.shape == (4, 2) and ds.y_test.dtype == np.int64
    assert ds.classes is None and ds.source == str(tmp_path / "d.npz")


def test_npz_string_labels_become_classes(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1)), y=np.array(["dog", "cat", "dog", "emu"]),
             x_test=np.zeros((2, 1)), y_test=np.array(["ant", "cat"]))
    ds = load_dataset(("npz", {"path": str(tmp_path / "d.npz")}))
    assert ds.classes == ["ant", "cat", "dog", "emu"]
    assert ds.y_train.tolist() == [2, 1, 2, 3] and ds.y_test.tolist() == [0, 1]


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))   # unpickling creates the marker file


def test_npz_with_a_pickled_object_array_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "evil.npz", x=np.array([_RunsCodeWhenUnpickled(marker)], dtype=object),
             y=np.zeros(1))
    with pytest.raises(GraphcError) as e:
        load_dataset(("npz", {"path": "evil.npz"}), base_dir=tmp_path)
    assert "array 'x' holds Python objects" in message(e) and "refuses" in message(e)
    assert not marker.exists()
    # the oracle: the same file does run code when unpickling is allowed
    with np.load(tmp_path / "evil.npz", allow_pickle=True) as npz:
        npz["x"][0].close()
    assert marker.exists()


def test_npz_missing_keys_list_the_keys_present(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(GraphcError) as e:
        load_dataset(("npz", {"path": "d.npz"}), base_dir=tmp_path)
    assert "no array named 'x': the archive holds X, y" in message(e)
    assert "did you mean 'X'?" in message(e)
    np.savez(tmp_path / "t.npz", x=np.zeros((3, 2)), y=np.zeros(3), x_test=np.zeros((1, 2)))
    with pytest.raises(GraphcError, match="x_test and y_test come together"):
        load_dataset(("npz", {"path": "t.npz"}), base_dir=tmp_path)


def test_npz_length_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(GraphcError, match="'x' has 5 samples but 'y' has 4 labels"):
        load_dataset(("npz", {"path": "d.npz"}), base_dir=tmp_path)


def test_npz_that_is_not_an_archive(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(GraphcError, match="not an .npz archive"):
        load_dataset(("npz", {"path": "text.npz"}), base_dir=tmp_path)
    with open(tmp_path / "one.npz", "wb") as f:         # a file object: np.save adds no .npy
        np.save(f, np.zeros(3))
    with pytest.raises(GraphcError, match="a .npy file holds one array"):
        load_dataset(("npz", {"path": "one.npz"}), base_dir=tmp_path)
    with pytest.raises(GraphcError) as e:
        load_dataset(("npz", {"path": "gone.npz"}), base_dir=tmp_path)
    assert message(e).startswith(f"{tmp_path / 'gone.npz'}: error: no such file")
    assert "the .nn file's folder" in message(e)


# --- CSV -------------------------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_with_integer_labels(tmp_path):
    write(tmp_path / "d.csv", "a,label,b\n1,0,2.5\n\n3,2,-4\n")
    ds = load_dataset(("csv", {"path": "d.csv", "label": "label"}), base_dir=tmp_path)
    np.testing.assert_array_equal(ds.x_train, [[1, 2.5], [3, -4]])
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == [0, 2]
    assert ds.classes is None and ds.x_test is None


def test_csv_with_float_targets_is_regression(tmp_path):
    write(tmp_path / "d.csv", "x,t\n1,0.5\n2,1\n")
    ds = load_dataset(("csv", {"path": "d.csv", "label": "t"}), base_dir=tmp_path)
    assert ds.y_train.dtype == np.float64 and ds.y_train.tolist() == [0.5, 1.0]


def test_csv_string_labels_become_sorted_classes(tmp_path):
    write(tmp_path / "iris.csv", 'sepal,species,petal\n1,virginica,2\n3,"setosa",4\n'
                                 '5, versicolor ,6\n7,setosa,8\n')
    ds = load_dataset(("csv", {"path": "iris.csv", "label": "species"}), base_dir=tmp_path)
    assert ds.classes == ["setosa", "versicolor", "virginica"]
    assert ds.y_train.tolist() == [2, 0, 1, 0]
    np.testing.assert_array_equal(ds.x_train, [[1, 2], [3, 4], [5, 6], [7, 8]])


def test_csv_bad_cell_points_at_its_line_and_column(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,y\n1,2,0\n3,abc,1\n")
    with pytest.raises(GraphcError) as e:
        load_dataset(("csv", {"path": "d.csv", "label": "y"}), base_dir=tmp_path)
    assert message(e).splitlines()[:3] == [
        f"{path}:3:3: error: 'abc' in column 'b' is not a number",
        "   3 | 3,abc,1",
        "     |   ^~~"]
    assert "only the label column ('y') may hold names" in message(e)


def test_csv_quoted_cells_and_their_columns(tmp_path):
    path = write(tmp_path / "d.csv", 'name,v,y\n"a, b",1,0\n"c ""d""",x,1\n')
    with pytest.raises(GraphcError) as e:
        load_dataset(("csv", {"path": "d.csv", "label": "y"}), base_dir=tmp_path)
    # the first column holds names, which a feature column may not
    assert message(e).startswith(f"{path}:2:1: error: 'a, b' in column 'name' is not a number")
    write(path, 'v,y\n1,"open\n')
    with pytest.raises(GraphcError, match=r"d.csv:2:3: error: unterminated quote"):
        load_dataset(("csv", {"path": "d.csv", "label": "y"}), base_dir=tmp_path)


def test_csv_missing_label_column_suggests_a_name(tmp_path):
    write(tmp_path / "d.csv", "a,species\n1,x\n")
    with pytest.raises(GraphcError) as e:
        load_dataset(("csv", {"path": "d.csv", "label": "specis"}), base_dir=tmp_path)
    assert "no column named 'specis'" in message(e) and "the columns are a, species" in message(e)
    assert "did you mean 'species'?" in message(e)


@pytest.mark.parametrize("text, expected", [
    ("", "empty file: expected a header row"),
    ("a,y\n", "no data rows after the header (line 1)"),
    ("a,y\n1,2\n1,2,3\n", ("d.csv:3:5: error: this row has 3 cells but the header (line 1) "
                           "names 2 columns")),
    ("a,b,y\n1,2,3\n\n1,2\n", "d.csv:4:4: error: this row has 2 cells"),
    ("a,y\n,1\n", "d.csv:2:1: error: empty cell in column 'a'"),
    ("a,y\n1,\n", "d.csv:2:3: error: empty label in column 'y'"),
    ("a,y\ninf,1\n", "'inf' in column 'a' is not a finite number"),
    ("a,a,y\n1,2,3\n", "d.csv:1:1: error: column 'a' appears twice in the header"),
    ("y\n1\n", "no feature columns"),
])
def test_malformed_csv(tmp_path, text, expected):
    write(tmp_path / "d.csv", text)
    with pytest.raises(GraphcError) as e:
        load_dataset(("csv", {"path": "d.csv", "label": "y"}), base_dir=tmp_path)
    assert expected in message(e)


# --- splits ----------------------------------------------------------------------------------------

def toy(n=100, test=None) -> Dataset:
    x = np.arange(n, dtype=np.float64).reshape(n, 1)
    x_test = None if test is None else np.arange(test, dtype=np.float64).reshape(test, 1) + 1000
    y_test = None if test is None else np.zeros(test, dtype=np.int64)
    return Dataset("toy", x, np.arange(n) % 10, x_test, y_test, None, "memory")


def test_split_without_a_test_set_cuts_60_20_20_and_partitions_the_data():
    parts = split(toy(), validation=0.2, test=0.2, seed=3)
    assert [len(parts[k][0]) for k in ("train", "val", "test")] == [60, 20, 20]
    seen = np.concatenate([parts[k][0][:, 0] for k in ("train", "val", "test")])
    assert sorted(seen.tolist()) == list(range(100))         # every sample exactly once
    for x, y in parts.values():
        np.testing.assert_array_equal(y, x[:, 0].astype(np.int64) % 10)   # pairs stay together


def test_split_is_determined_by_the_seed():
    a, b, c = (split(toy(), 0.2, 0.2, seed=s) for s in (7, 7, 8))
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a[k][0], b[k][0])
    assert not np.array_equal(a["val"][0], c["val"][0])


def test_split_keeps_the_data_sets_own_test_set():
    ds = toy(50, test=10)
    parts = split(ds, validation=0.2, test=0.3, seed=0)
    assert parts["test"][0] is ds.x_test and parts["test"][1] is ds.y_test
    assert len(parts["train"][0]) == 40 and len(parts["val"][0]) == 10
    both = np.concatenate([parts["train"][0], parts["val"][0]])[:, 0]
    assert sorted(both.tolist()) == list(range(50))


def test_split_refuses_empty_splits():
    with pytest.raises(GraphcError, match="the val split would be empty"):
        split(toy(4), 0.1, 0.3, seed=0)
    with pytest.raises(GraphcError, match="leave no training data"):
        split(toy(), 0.5, 0.5, seed=0)
    with pytest.raises(GraphcError, match=r"must be in \[0, 1\)"):
        split(toy(), 1.5, 0.1, seed=0)


# --- scaling ---------------------------------------------------------------------------------------

def test_standardize_uses_training_statistics_per_feature():
    rng = np.random.default_rng(0)
    train = rng.normal([1.0, -5.0, 3.0], [2.0, 0.5, 0.0], size=(200, 3))
    scaler = Scaler.fit("standardize", train)
    out = scaler.apply(train, dtype=np.float64)
    np.testing.assert_allclose(out[:, :2].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(out[:, :2].std(0), 1, atol=1e-12)
    assert scaler.std[2] == 1.0                             # a constant feature is only shifted
    other = rng.normal(size=(5, 3))
    np.testing.assert_allclose(scaler.apply(other, np.float64),
                               (other - train.mean(0)) / np.where(train.std(0) == 0, 1,
                                                                  train.std(0)))


def test_standardize_flattens_image_samples():
    x = np.random.default_rng(1).integers(0, 256, (50, 4, 4)).astype(np.uint8)
    scaler = Scaler.fit("standardize", x)
    assert scaler.mean.shape == (16,)
    out = scaler.apply(x)
    assert out.shape == (50, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out.reshape(50, 16).mean(0), 0, atol=1e-5)


def test_unit_and_none_scaling():
    x = np.array([[0.0, 8.0], [16.0, 4.0]])
    np.testing.assert_array_equal(Scaler.fit("unit", x).apply(x), [[0, 0.5], [1, 0.25]])
    shifted = Scaler.fit("unit", x + 10)
    assert (shifted.low, shifted.high) == (10.0, 26.0)
    out = Scaler.fit("none", x).apply(x)
    assert out.dtype == np.float32 and out.tolist() == x.tolist()


@pytest.mark.parametrize("mode", ["none", "unit", "standardize"])
def test_scaler_json_round_trip(mode):
    x = np.random.default_rng(2).normal(size=(30, 5))
    scaler = Scaler.fit(mode, x)
    record = json.loads(json.dumps(scaler.to_json()))
    again = Scaler.from_json(record)
    assert again.to_json() == scaler.to_json() and again.mode == mode
    np.testing.assert_array_equal(again.apply(x), scaler.apply(x))


def test_scaler_errors():
    with pytest.raises(GraphcError, match="did you mean 'standardize'"):
        Scaler.fit("standardise", np.zeros((2, 2)))
    with pytest.raises(GraphcError, match="malformed input-scaling record"):
        Scaler.from_json({"mode": "unit", "min": 0})


# --- fitting data to the model's inputs ------------------------------------------------------------

F32 = DType.f32


def test_fit_inputs_names_both_shapes_when_counts_differ():
    with pytest.raises(GraphcError) as e:
        fit_inputs(np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.int64),
                   TensorType(F32, ("N", 100)), TensorType(DType.i64, ("N",)), "mnist")
    assert message(e) == ("error: mnist samples are 28x28 (784 values) but input x of the model "
                          "is f32[N, 100] (100 values per sample)")


def test_fit_inputs_reshapes_to_image_inputs_and_regression_targets():
    x, y = fit_inputs(np.arange(12.0).reshape(3, 4), np.array([0.5, 1.5, 2.5]),
                      TensorType(F32, ("N", 2, 2)), TensorType(F32, ("N", 1)), "data.npz")
    assert x.shape == (3, 2, 2) and x.dtype == np.float32
    assert y.shape == (3, 1) and y.dtype == np.float32 and y[:, 0].tolist() == [0.5, 1.5, 2.5]


def test_fit_inputs_one_hot_encodes_class_indices_for_a_float_label_input():
    _, y = fit_inputs(np.zeros((3, 2)), np.array([2, 0, 1]), TensorType(F32, ("N", 2)),
                      TensorType(F32, ("N", 3)), "toy")
    np.testing.assert_array_equal(y, [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    with pytest.raises(GraphcError, match="class index 3, but input y of the model takes 3"):
        fit_inputs(np.zeros((1, 2)), np.array([3]), TensorType(F32, ("N", 2)),
                   TensorType(F32, ("N", 3)), "toy")


def test_fit_inputs_label_errors():
    x, x_type = np.zeros((2, 2)), TensorType(F32, ("N", 2))
    with pytest.raises(GraphcError) as e:
        fit_inputs(x, np.array([0.5, 1.0]), x_type, TensorType(DType.i64, ("N",)), "d.csv")
    assert "d.csv labels are floats (regression targets) but input y of the model is i64[N]" \
        in message(e)
    assert "declare input y as f32[N]" in message(e)
    with pytest.raises(GraphcError, match="store them as integers"):
        fit_inputs(x, np.array([0.0, 1.0]), x_type, TensorType(DType.i64, ("N",)), "d.npz")
    with pytest.raises(GraphcError, match="has label -1, but class indices start at 0"):
        fit_inputs(x, np.array([-1, 1]), x_type, TensorType(DType.i64, ("N",)), "d.npz")
    with pytest.raises(GraphcError, match="class index 9, but input y of the model takes 5"):
        fit_inputs(x, np.array([9, 1]), x_type, TensorType(DType.i64, ("N",)), "d", num_classes=5)
    with pytest.raises(GraphcError, match="2 samples but 3 labels"):
        fit_inputs(x, np.zeros(3, np.int64), x_type, TensorType(DType.i64, ("N",)), "d")
    _, y = fit_inputs(x, np.array([1, 0]), x_type, TensorType(DType.i32, ("N",)), "d")
    assert y.dtype == np.int32 and y.tolist() == [1, 0]


# --- minibatches -----------------------------------------------------------------------------------

def test_batches_cover_every_index_once_and_keep_the_last_partial_batch():
    parts = batches(103, 10, seed=5, epoch=0)
    assert [len(b) for b in parts] == [10] * 10 + [3]
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert np.concatenate(parts).tolist() != list(range(103))       # shuffled


def test_batches_are_reproducible_per_seed_and_epoch():
    same = [np.concatenate(batches(50, 8, seed=1, epoch=3)) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], np.concatenate(batches(50, 8, seed=1, epoch=4)))
    assert not np.array_equal(same[0], np.concatenate(batches(50, 8, seed=2, epoch=3)))
    ordered = batches(5, 2, seed=1, epoch=0, shuffle=False)
    assert [b.tolist() for b in ordered] == [[0, 1], [2, 3], [4]]

