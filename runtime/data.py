"""Training data: load the data set a train block names (digits, MNIST, Fashion-MNIST, .npz, CSV),
split it, scale it, fit it to the model's input types, and cut it into minibatches.
Every problem with a file is a `GraphcError` naming the file (and, in a CSV, the line and column).
Over 500 lines: a loader per format (digits, IDX, .npz; CSV in csv_data.py), then splitting,
scaling, fitting and batching, each a few short functions."""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphc.errors import did_you_mean, error
from graphc.files import MAX_DATA_BYTES, Npz, listing, open_regular
from graphc.ir.preprocess import SCALINGS
from graphc.ir.types import TensorType, format_shape
from graphc.runtime.csv_data import read_csv


@dataclass
class Dataset:
    """A data set as loaded, before splitting, fitting to the model and scaling."""

    name: str                      # "digits", "mnist", "fashion_mnist", "npz", "csv"
    x_train: np.ndarray            # raw features (uint8 images stay uint8)
    y_train: np.ndarray            # int64 class indices, or float targets
    x_test: np.ndarray | None      # the data set's own test split, where it has one
    y_test: np.ndarray | None
    classes: list[str] | None      # class names when the labels were strings, else None
    source: str                    # the folder or file it came from


def load_dataset(spec: tuple[str, dict], data_dir: str | None = None,
                 base_dir: str | Path = ".") -> Dataset:
    """Load `(name, options)` as resolved from a train block. MNIST-style sets are read from
    `data_dir`, else $GRAPHC_DATA; relative npz/csv paths resolve against `base_dir`."""
    name, options = spec
    if name not in _OPTIONS:
        raise error(f"unknown data set '{name}': expected one of {', '.join(_OPTIONS)}",
                    hint=did_you_mean(name, _OPTIONS))
    wanted = _OPTIONS[name]
    unknown = sorted(set(options) - set(wanted))
    missing = [k for k in wanted if k not in options]
    if unknown or missing:
        takes = f"takes {', '.join(wanted)}" if wanted else "takes no options"
        problem = f"unknown option {unknown[0]!r}" if unknown else f"option {missing[0]!r} is missing"
        raise error(f"data set {name}: {problem} ({name} {takes})")
    return _LOADERS[name](name, options, data_dir, Path(base_dir))


# --- digits (scikit-learn) ---------------------------------------------------------------------

def _load_digits(name, options, data_dir, base_dir) -> Dataset:
    try:   # optional dependency: only the digits data set needs it
        from sklearn.datasets import load_digits
    except ImportError:
        raise error("the digits data set needs scikit-learn, which is not installed",
                    hint="pip install -e '.[digits]' (from graphc's clone), or pip install "
                         "scikit-learn") from None
    digits = load_digits()
    return Dataset(name, np.asarray(digits.data, dtype=np.float64),
                   np.asarray(digits.target, dtype=np.int64), None, None, None,
                   "sklearn.datasets.load_digits")


# --- MNIST and Fashion-MNIST (IDX files) -------------------------------------------------------

IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801      # unsigned bytes, 3 and 1 dimensions
_IDX_KINDS = {IDX_IMAGES: ("image", 3), IDX_LABELS: ("label", 1)}
_IDX_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_SUBFOLDERS = {"mnist": ("mnist",), "fashion_mnist": ("fashion-mnist", "fashion_mnist")}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode one IDX file of unsigned bytes, gzip-compressed or not: images (magic IDX_IMAGES)
    as uint8 [n, rows, cols], labels (IDX_LABELS) as uint8 [n]. The header's sizes are checked
    against MAX_DATA_BYTES before the data is decompressed, and no more than they promise is."""
    path = Path(path)
    kind, ndim = _IDX_KINDS[magic]
    header = 4 + 4 * ndim
    with open_regular(path) as f, _maybe_gzip(f, path) as stream:
        head = _read_upto(stream, header, path)
        found = int.from_bytes(head[:4], "big")
        if isinstance(stream, gzip.GzipFile) and (len(head) < header or found != magic):
            _drain(stream, path)    # damaged gzip data is the cause to report, where it is one
        if len(head) >= 4 and found != magic:
            other = _IDX_KINDS.get(found)
            hint = (f"this is an IDX {other[0]} file: are the image and label files swapped?"
                    if other else None)
            raise error(f"not an IDX {kind} file (magic number 0x{found:08X}, expected "
                        f"0x{magic:08X})", file=path, hint=hint)
        if len(head) < header:
            raise error(f"too short for an IDX {kind} file: {len(head)} bytes, but its header "
                        f"alone takes {header}", file=path)
        dims = struct.unpack(f">{ndim}i", head[4:header])
        if min(dims) < 0:
            raise error(f"corrupt IDX header: negative size in {list(dims)}", file=path)
        need = math.prod(dims)
        says = f"{dims[0]} images of {dims[1]}x{dims[2]}" if ndim == 3 else f"{dims[0]} labels"
        if need > MAX_DATA_BYTES:
            raise error(f"the header says {says} ({need:,} bytes), over the limit of "
                        f"{MAX_DATA_BYTES:,} bytes", file=path)
        data = _read_upto(stream, need, path)
        extra = len(_read_upto(stream, 1, path))
    if len(data) != need or extra:
        have = f"{len(data)} bytes" if not extra else "more"
        problem = "truncated" if len(data) < need else "corrupt"
        raise error(f"{problem}: the header says {says} ({need} bytes) but the file holds {have} "
                    f"bytes after its {header}-byte header", file=path,
                    hint="the file is damaged or incomplete: fetch it again")
    return np.frombuffer(data, np.uint8).reshape(dims)


def _maybe_gzip(f, path: Path):
    """A stream of the file's bytes, decompressed when it is gzip data (decided by content)."""
    start = f.read(4)
    f.seek(0)
    if start[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if path.suffix == ".gz":
        raise error(f"not a gzip file (it starts with bytes {start.hex(' ') or 'none'}; gzip "
                    f"starts with 1f 8b)", file=path,
                    hint="an uncompressed IDX file should be named without .gz")
    return contextlib.nullcontext(f)


def _drain(stream, path: Path) -> None:
    """Read to the end (at most MAX_DATA_BYTES, in bounded chunks), so damaged gzip data shows."""
    for _ in range(MAX_DATA_BYTES >> 24):
        if not _read_upto(stream, 1 << 24, path):
            return


def _read_upto(stream, n: int, path: Path) -> bytearray:
    """Up to `n` bytes (fewer only at the end of the data), read in bounded chunks."""
    out = bytearray()
    try:
        while len(out) < n:
            chunk = stream.read(min(n - len(out), 1 << 24))
            if not chunk:
                break
            out += chunk
    except (OSError, EOFError, zlib.error) as err:
        raise error(f"corrupt gzip data ({err})", file=path,
                    hint="the download was cut short or damaged: fetch the file again") from None
    return out


def _data_folder(name: str, data_dir) -> tuple[Path, str]:
    if data_dir:
        return Path(data_dir).expanduser(), ""
    env = os.environ.get("GRAPHC_DATA")
    if env:
        return Path(env).expanduser(), " (from GRAPHC_DATA)"
    files = ", ".join(f"{s}.gz" for pair in _IDX_SPLITS.values() for s in pair)
    raise error(f"{name}: no data folder given: {name} is read from the IDX files {files}",
                hint=_folder_hint(name))


def _folder_hint(name: str) -> str:
    subs = " or ".join(f"{s}/" for s in _SUBFOLDERS[name])
    return (f"pass --data-dir FOLDER or set GRAPHC_DATA=FOLDER, where FOLDER holds the files "
            f"or has them in a subfolder {subs}")


def _find_idx_files(name: str, data_dir) -> tuple[Path, dict[str, Path]]:
    root, origin = _data_folder(name, data_dir)
    if not root.is_dir():
        raise error(f"{name}: the data folder {root}{origin} does not exist or is not a folder",
                    hint=_folder_hint(name))
    stems = [s for pair in _IDX_SPLITS.values() for s in pair]
    candidates = [root] + [root / sub for sub in _SUBFOLDERS[name]]
    partial = None
    for folder in candidates:
        found = {s: _existing(folder, s) for s in stems}
        if all(found.values()):
            return folder, found
        if partial is None and any(found.values()):
            partial = (folder, found)
    if partial:
        folder, found = partial
        missing = ", ".join(f"{s}.gz" for s, p in found.items() if p is None)
        raise error(f"{name}: {folder} holds only some of the data files: {missing} "
                    f"(or the same without .gz) not found")
    wanted = ", ".join(f"{s}.gz" for s in stems)
    where = ", ".join(str(c) for c in candidates)
    raise error(f"{name}: data files not found: looked for {wanted} (or the same names without "
                f".gz) in {where}{origin}", hint=_folder_hint(name))


def _existing(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(name, options, data_dir, base_dir) -> Dataset:
    folder, files = _find_idx_files(name, data_dir)
    parts = {}
    for part, (image_stem, label_stem) in _IDX_SPLITS.items():
        images = read_idx(files[image_stem], IDX_IMAGES)
        labels = read_idx(files[label_stem], IDX_LABELS)
        if len(images) != len(labels):
            raise error(f"holds {len(images)} images but {files[label_stem].name} holds "
                        f"{len(labels)} labels", file=files[image_stem],
                        hint="the two files of a split must come from the same release")
        parts[part] = (images, labels.astype(np.int64))
    (x_train, y_train), (x_test, y_test) = parts["train"], parts["test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise error(f"test images are {'x'.join(map(str, x_test.shape[1:]))} but training images "
                    f"are {'x'.join(map(str, x_train.shape[1:]))}", file=files["t10k-images-idx3-ubyte"])
    return Dataset(name, x_train, y_train, x_test, y_test, None, str(folder))


# --- .npz archives -----------------------------------------------------------------------------

def _resolve_path(options: dict, base_dir: Path) -> Path:
    path = Path(options["path"]).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        hint = None if Path(options["path"]).is_absolute() else \
            f"the data path {options['path']!r} is relative to the .nn file's folder ({base_dir})"
        raise error("no such file" if not path.exists() else "not a file", file=path, hint=hint)
    return path


def _load_npz(name, options, data_dir, base_dir) -> Dataset:
    path = _resolve_path(options, base_dir)
    with open_regular(path) as f:
        if not zipfile.is_zipfile(f):
            f.seek(0)
            is_npy = f.read(6) == b"\x93NUMPY"
            raise error("a .npy file holds one array; expected an .npz archive" if is_npy
                        else "not an .npz archive (not a zip file)", file=path,
                        hint="save the features as x and the labels as y: np.savez(path, x=x, y=y)")
        f.seek(0)
        with Npz(f, path) as npz:      # reads only x, y, x_test, y_test, each within its bound
            keys = npz.names
            for key in ("x", "y"):
                if key not in keys:
                    raise error(f"no array named '{key}': the archive holds "
                                f"{listing(keys) or 'no arrays'}", file=path,
                                hint=did_you_mean(key, keys[:1000]) or
                                "save the features as x and the labels as y: "
                                "np.savez(path, x=x, y=y)")
            if ("x_test" in keys) != ("y_test" in keys):
                raise error("x_test and y_test come together: the archive holds only "
                            f"{'x_test' if 'x_test' in keys else 'y_test'}", file=path)
            wanted = [k for k in ("x", "y", "x_test", "y_test") if k in keys]
            arrays = {k: _npz_array(npz.read(k, MAX_DATA_BYTES), k, path) for k in wanted}
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        if x_key in arrays:
            _check_pair(path, x_key, arrays[x_key], y_key, arrays[y_key])
            _check_finite(path, x_key, arrays[x_key], "sample")
            if arrays[y_key].dtype.kind == "f":
                _check_finite(path, y_key, arrays[y_key], "label")
    y, y_test, classes = _npz_labels(path, arrays["y"], arrays.get("y_test"))
    return Dataset(name, arrays["x"], y, arrays.get("x_test"), y_test, classes, str(path))


def _npz_array(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    kinds = "biuf" if key.startswith("x") else "biufU"
    if array.dtype.kind not in kinds:
        raise error(f"array '{key}' has dtype {array.dtype}; expected numbers"
                    + (" or strings" if "U" in kinds else ""), file=path)
    return array


def _check_finite(path: Path, key: str, a: np.ndarray, noun: str) -> None:
    """Name the first NaN or infinity: its sample and, within the sample, its position."""
    if a.dtype.kind != "f" or a.ndim == 0:
        return
    rows = max(1, (1 << 24) // max(a[0].size, 1))
    for start in range(0, len(a), rows):     # chunks: no boolean copy of all of a
        bad = np.flatnonzero(~np.isfinite(a[start:start + rows]))
        if bad.size:
            sample, within = divmod(int(bad[0]), max(a[0].size, 1))
            sample += start
            where = (f", feature {within}" if a.ndim == 2 else
                     f", position {list(np.unravel_index(within, a.shape[1:]))}" if a.ndim > 2 else "")
            value = a[sample].reshape(-1)[within] if a.ndim > 1 else a[sample]
            raise error(f"array '{key}' holds {value} at {noun} {sample}{where} (counting from 0)",
                        file=path, hint="remove or fill in missing values before training")


def _check_pair(path: Path, x_key: str, x: np.ndarray, y_key: str, y: np.ndarray) -> None:
    if x.ndim == 0 or y.ndim == 0:
        raise error(f"'{x_key if x.ndim == 0 else y_key}' is a single value; expected one entry "
                    f"per sample", file=path)
    if len(x) != len(y):
        raise error(f"'{x_key}' has {len(x)} samples but '{y_key}' has {len(y)} labels",
                    file=path)
    if len(x) == 0:
        raise error(f"'{x_key}' holds no samples", file=path)


def _npz_labels(path: Path, y: np.ndarray, y_test: np.ndarray | None):
    """Numeric labels: integers become int64 class indices, floats stay targets. String labels:
    class names, indexed in sorted order over both splits, as for a CSV."""
    if y_test is not None and (y.dtype.kind == "U") != (y_test.dtype.kind == "U"):
        raise error("'y' and 'y_test' must both be class names or both be numbers", file=path)
    if y.dtype.kind == "U":
        both = y if y_test is None else np.concatenate([y.ravel(), y_test.ravel()])
        names = np.unique(both)
        y, y_test = (None if a is None else np.searchsorted(names, a).astype(np.int64)
                     for a in (y, y_test))
        return y, y_test, [str(n) for n in names]
    y, y_test = (a.astype(np.int64) if a is not None and a.dtype.kind in "biu" else a
                 for a in (y, y_test))
    return y, y_test, None


# --- CSV ---------------------------------------------------------------------------------------

def _load_csv(name, options, data_dir, base_dir) -> Dataset:
    path = _resolve_path(options, base_dir)
    x, y, classes = read_csv(path, options["label"])
    return Dataset(name, x, y, None, None, classes, str(path))


_LOADERS = {"digits": _load_digits, "mnist": _load_idx_dataset,
            "fashion_mnist": _load_idx_dataset, "npz": _load_npz, "csv": _load_csv}
_OPTIONS = {"digits": (), "mnist": (), "fashion_mnist": (), "npz": ("path",),
            "csv": ("path", "label")}


# --- splits, scaling, batches ------------------------------------------------------------------

def split(ds: Dataset, validation: float, test: float,
          seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "val", "test"}: (x, y) each. A data set with its own test split keeps it (and
    `test` is unused) and gives `validation` of its training set to "val"; any other is shuffled
    once by `seed` and cut by the fractions."""
    for what, frac in (("validation", validation), ("test", test)):
        if not 0 <= frac < 1:
            raise error(f"the {what} fraction must be in [0, 1), not {frac}")
    n = len(ds.x_train)
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * validation)
    if ds.x_test is not None:
        parts = {"train": order[n_val:], "val": order[:n_val]}
    else:
        if validation + test >= 1:
            raise error(f"validation ({validation}) and test ({test}) fractions leave no "
                        f"training data")
        n_test = round(n * test)
        n_train = n - n_val - n_test
        parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
                 "test": order[n_train + n_val:]}
    out = {k: (ds.x_train[idx], ds.y_train[idx]) for k, idx in parts.items()}
    if ds.x_test is not None:
        out["test"] = (ds.x_test, ds.y_test)
    for k in ("train", "val", "test"):
        if len(out[k][0]) == 0:
            raise error(f"{ds.name}: the {k} split would be empty ({n} training samples, "
                        f"validation={validation}, test={test})",
                        hint="use larger fractions or more data")
    return out




@dataclass(eq=False)
class Scaler:
    """Input scaling, fitted on the training split only and applied to every split."""

    mode: str                       # "none" | "unit" | "standardize"
    low: float = 0.0                # unit: the training data's minimum and maximum
    high: float = 1.0
    mean: np.ndarray | None = None  # standardize: per feature, over flattened samples
    std: np.ndarray | None = None

    @classmethod
    def fit(cls, mode: str, x: np.ndarray) -> Scaler:
        if mode not in SCALINGS:
            raise error(f"unknown scaling '{mode}': expected {', '.join(SCALINGS)}",
                        hint=did_you_mean(mode, SCALINGS))
        if mode == "none":
            return cls(mode)
        if len(x) == 0:
            raise error("cannot fit input scaling on an empty training split")
        if mode == "unit":
            low, high = float(x.min()), float(x.max())
            if not (math.isfinite(low) and math.isfinite(high)):
                raise error(f"the training data holds non-finite values ({low}..{high})")
            return cls(mode, low=low, high=high)
        flat = x.reshape(len(x), -1)
        mean = flat.mean(axis=0, dtype=np.float64)
        squares = np.zeros_like(mean)
        for start in range(0, len(flat), 4096):     # chunks: no float64 copy of all of x
            d = flat[start:start + 4096] - mean
            squares += np.einsum("ij,ij->j", d, d)
        std = np.sqrt(squares / len(flat))
        if not np.all(np.isfinite(mean)):
            raise error("the training data holds non-finite values")
        std[std == 0] = 1.0         # a constant feature is only shifted
        return cls(mode, mean=mean, std=std)

    def apply(self, x: np.ndarray, dtype=np.float32) -> np.ndarray:
        dtype = np.dtype(dtype)
        if self.mode == "none":
            return x.astype(dtype, copy=False)
        if dtype.kind != "f":
            raise error(f"input scaling '{self.mode}' makes fractions, but the input is {dtype}",
                        hint="use scale = none for integer inputs")
        out = x.astype(dtype)       # a copy: the caller's array stays untouched
        if self.mode == "unit":
            span = self.high - self.low
            out -= dtype.type(self.low)
            out /= dtype.type(span if span else 1.0)
            return out
        flat = out.reshape(len(out), math.prod(out.shape[1:]))     # zero samples too
        if flat.shape[1] != len(self.mean):
            raise error(f"the scaler was fitted on samples of {len(self.mean)} values, these have "
                        f"{flat.shape[1]}")
        flat -= self.mean.astype(dtype)
        flat /= self.std.astype(dtype)
        return out

    def to_json(self) -> dict:
        if self.mode == "unit":
            return {"mode": self.mode, "min": self.low, "max": self.high}
        if self.mode == "standardize":
            return {"mode": self.mode, "mean": self.mean.tolist(), "std": self.std.tolist()}
        return {"mode": self.mode}

    @classmethod
    def from_json(cls, d: dict) -> Scaler:
        keys = {"none": {"mode"}, "unit": {"mode", "min", "max"},
                "standardize": {"mode", "mean", "std"}}
        if not isinstance(d, dict) or not isinstance(d.get("mode"), str) \
                or keys.get(d["mode"]) != set(d):
            raise error(f"malformed input-scaling record: {str(d)[:120]}")
        numbers = [d[k] for k in ("min", "max") if k in d] + \
            [v for k in ("mean", "std") if k in d for v in (d[k] if isinstance(d[k], list) else [d[k]])]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in numbers):
            raise error("malformed input-scaling record: its statistics must be finite numbers")
        if d["mode"] == "unit":
            return cls("unit", low=float(d["min"]), high=float(d["max"]))
        if d["mode"] == "standardize":
            mean, std = (np.asarray(d[k], dtype=np.float64) for k in ("mean", "std"))
            if mean.ndim != 1 or mean.shape != std.shape:
                raise error("malformed input-scaling record: mean and std differ in length")
            if np.any(std <= 0):
                raise error("malformed input-scaling record: a standard deviation is not positive")
            return cls("standardize", mean=mean, std=std)
        return cls("none")


def fit_inputs(x: np.ndarray, y: np.ndarray, x_type: TensorType, y_type: TensorType, what: str,
               *, x_name: str = "x", y_name: str = "y",
               num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shape and cast samples and labels for the model's inputs: each sample is reshaped to the
    input's non-batch shape when the counts agree; integer labels feed an integer input (checked
    against `num_classes` when given) or, one-hot, a float input [N, K]."""
    if len(x) != len(y):
        raise error(f"{what} has {len(x)} samples but {len(y)} labels")
    x = _reshape_samples(x, x_type, what, "samples", x_name)
    x_dtype = _numpy_dtype(x_type, x_name)
    if x.dtype != x_dtype:
        if x.dtype.kind not in "biuf":
            raise error(f"{what} samples have dtype {x.dtype}; expected numbers")
        if x_dtype.kind in "iub" and x.dtype.kind == "f" and not _whole(x):
            raise error(f"{what} samples hold fractions but input {x_name} of the model is "
                        f"{x_type}")
        x = x.astype(x_dtype)
    return x, _fit_labels(y, y_type, what, y_name, num_classes)


def check_labels(ds: Dataset, t: TensorType, what: str, name: str, num_classes=None) -> None:
    """Check a whole data set's labels against the model's label input before it is split and
    shuffled, so that an error names the sample's place in the file."""
    _fit_labels(ds.y_train, t, what, name, num_classes)
    if ds.y_test is not None:
        _fit_labels(ds.y_test, t, f"{what} (its test split)", name, num_classes)


def _fit_labels(y: np.ndarray, t: TensorType, what: str, name: str, num_classes) -> np.ndarray:
    target = _numpy_dtype(t, name)
    if y.dtype.kind not in "biuf":
        raise error(f"{what} labels have dtype {y.dtype}; expected numbers")
    is_index = y.dtype.kind in "biu"
    if t.dtype.is_int and not is_index:
        hint = ("they are all whole numbers: store them as integers" if _whole(y) else
                f"for a regression target declare input {name} as f32"
                f"{format_shape(t.shape)}")
        raise error(f"{what} labels are floats (regression targets) but input {name} of the "
                    f"model is {t}, which takes class indices", hint=hint)
    rest = t.shape[1:]
    one_hot = (t.dtype.is_float and is_index and y.ndim == 1 and len(rest) == 1
               and isinstance(rest[0], int) and rest[0] > 1)
    if t.dtype.is_int or one_hot:
        classes = min(num_classes or rest[0], rest[0]) if one_hot else num_classes
        _check_classes(y, what, name, classes)
    if one_hot:
        out = np.zeros((len(y), rest[0]), dtype=target)
        out[np.arange(len(y)), y] = 1
        return out
    return _reshape_samples(y, t, what, "labels", name).astype(target, copy=False)


def _check_classes(y: np.ndarray, what: str, name: str, classes: int | None) -> None:
    if y.size == 0:
        return
    low = np.flatnonzero(y < 0)
    if low.size:
        i = int(low[0])
        raise error(f"{what}: sample {i} (counting from 0) has label {int(y[i])}, but class "
                    f"indices start at 0")
    high = np.flatnonzero(y >= classes) if classes is not None else low
    if high.size:
        i = int(high[0])
        raise error(f"{what}: sample {i} (counting from 0) has class index {int(y[i])}, but "
                    f"input {name} of the model takes {classes} classes (0..{classes - 1})")


def _reshape_samples(a: np.ndarray, t: TensorType, what: str, noun: str, name: str) -> np.ndarray:
    if t.ndim == 0:
        raise error(f"input {name} of the model is {t}, a single value: it needs a batch "
                    f"dimension first")
    have, want = a.shape[1:], t.shape[1:]
    per_sample = ""
    if all(isinstance(d, int) for d in want):
        if have == want:
            return a
        if math.prod(have) == math.prod(want):
            return a.reshape((len(a),) + tuple(want))
        per_sample = f" ({math.prod(want)} values per sample)"
    elif len(have) == len(want) and all(not isinstance(w, int) or w == h
                                        for h, w in zip(have, want)):
        return a    # symbolic dimensions take any size
    hint = None
    if what == "digits":     # also what a train block without `data` trains on
        hint = ("a train block that names no `data` trains on the digits (8x8 images); name the "
                "data set, for example data = mnist, or data = npz(\"file.npz\")")
    raise error(f"{what} {noun} {_describe_sample(have)} but input {name} of the model is "
                f"{t}{per_sample}", hint=hint)


def _describe_sample(shape: tuple) -> str:
    if not shape:
        return "are single values"
    if len(shape) == 1:
        return f"have {shape[0]} values"
    return f"are {'x'.join(map(str, shape))} ({math.prod(shape)} values)"


def _numpy_dtype(t: TensorType, name: str) -> np.dtype:
    try:
        return t.dtype.numpy
    except NotImplementedError:
        raise error(f"input {name} is {t}, which numpy cannot hold") from None


def _whole(a: np.ndarray) -> bool:
    return bool(a.size) and bool(np.all(np.isfinite(a))) and bool(np.all(a == np.floor(a)))


def batches(n: int, batch: int, seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Index arrays of the minibatches of one epoch, the last one partial. The order depends only
    on (seed, epoch), so a resumed run regenerates any epoch without carrying RNG state."""
    if batch < 1:
        raise error(f"the batch size must be at least 1, not {batch}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch] for i in range(0, n, batch)]
