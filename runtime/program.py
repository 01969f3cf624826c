"""A compiled program: parameters (a live, checked mapping), optimizer state, and the calls that
run its graphs: `forward`, `evaluate`, `loss_and_grads` and `train_step`."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, MutableMapping

import numpy as np

from graphc.backends.numpy.executor import BACKENDS
from graphc.backends.split import linkable, make_executor
from graphc.errors import GraphcError, ProgramError, did_you_mean, error
from graphc.ir.contract import (  # noqa: F401 (ParamInfo, StateInfo: re-exported)
    FED_INPUTS,
    LR_INPUT,
    RNG_INPUT,
    ParamInfo,
    StateInfo,
    TrainStep,
    grad_output,
    rng_key,
)
from graphc.ir.node import Graph
from graphc.ir.preprocess import Preprocessing
from graphc.ir.types import DType, TensorType, bind_shape, format_shape
from graphc.runtime.artifact import read_artifact, save_artifact
from graphc.targets import BACKEND_NAMES, PRECISIONS
from graphc.train_config import OptimizerSpec, call_from_json


def executor_class(backend: str):
    """The executor of a backend; compiled backends import their toolchains only here."""
    if backend == "llvm":
        from graphc.backends.llvm.executor import LLVMExecutor
        return LLVMExecutor
    if backend == "cuda":
        from graphc.backends.cuda.executor import CUDAExecutor
        return CUDAExecutor
    return BACKENDS[backend]


PREDICT_BATCH = 256       # samples per forward call of `predict`: bounded memory for any size


class Loss:
    """A train step's loss, which a device backend may still be computing: `float(loss)` waits
    for it (and raises the step's failed check, if one failed); `ready()` tells without waiting."""

    def __init__(self, value: float | Callable[[], object], ready: Callable[[], bool] | None = None):
        self._value = value if isinstance(value, float) else None
        self._read = None if isinstance(value, float) else value
        self._ready = ready

    def ready(self) -> bool:
        return self._value is not None or self._ready is None or self._ready()

    def __float__(self) -> float:
        if self._value is None:
            self._value = float(self._read())
            self._read = self._ready = None
        return self._value

    def __repr__(self) -> str:
        return f"Loss({self._value})" if self._value is not None else "Loss(pending)"


class ParamStore(MutableMapping):
    """name -> ndarray. Assigning checks shape and dtype; the program uses the new value at once."""

    def __init__(self, infos: dict[str, ParamInfo], values: dict[str, np.ndarray], sync=None):
        self._infos, self._values = infos, values
        self._sync = sync          # brings the values up to date (a device backend holds newer)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._values:
            raise KeyError(self._unknown(name))
        if self._sync is not None:
            self._sync()
        return self._values[name]

    def __setitem__(self, name: str, value) -> None:
        if name not in self._infos:
            raise KeyError(self._unknown(name))
        info = self._infos[name]
        array = np.asarray(value)
        want = info.type.dtype.numpy
        if array.shape != tuple(info.type.shape):
            raise ProgramError(f"parameter {name} is {info.type}; got an array of shape "
                               f"{format_shape(array.shape)}")
        if array.dtype.kind != want.kind:   # any float precision converts; ints or bools do not
            raise ProgramError(f"parameter {name} is {info.type}; got an array of dtype "
                               f"{array.dtype}")
        self._values[name] = np.array(array, dtype=want, order="C")   # a copy: the caller keeps theirs

    def __delitem__(self, name: str) -> None:
        raise ProgramError(f"parameters cannot be removed (tried {name})")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def _unknown(self, name: str) -> str:
        hint = did_you_mean(name, self._infos)
        return f"no parameter named {name!r}" + (f"; {hint}" if hint else "")

    def __repr__(self) -> str:
        return "ParamStore({" + ", ".join(f"{k!r}: {v.dtype}{list(v.shape)}"
                                          for k, v in self._values.items()) + "})"


class Program:
    """What `graphc.compile_file` returns and `graphc.runtime.load_artifact` restores."""

    def __init__(self, name: str, graphs: dict[str, Graph], params: dict[str, ParamInfo],
                 values: dict[str, np.ndarray], backend: str = "numpy", meta: dict | None = None,
                 state: dict[str, StateInfo] | None = None, train_step: TrainStep | None = None,
                 preprocessing: Preprocessing | None = None):
        """`train_step`: the contract of graph `train_step`, which it must come with.
        `preprocessing`: the input scaling the graphs already hold (they then take raw data)."""
        if backend not in BACKEND_NAMES:
            raise error(f"unknown backend '{backend}'",
                        hint=did_you_mean(backend, BACKEND_NAMES) or f"backends: {', '.join(BACKEND_NAMES)}")
        self.name, self.backend = name, backend
        self.meta = dict(meta or {})
        self.state_info = dict(state or {})
        assert ("train_step" in graphs) == (train_step is not None), (
            f"internal error: program {name}: a train_step graph comes with its contract")
        self.train_step_contract = train_step
        self.precision = "f32"                  # of matrix products (use_precision)
        self._executors: dict = {}
        self._state: dict[str, np.ndarray] = {}
        self.reset_state()
        self._build(graphs, params, values, preprocessing)
        train = self.meta.get("train") or {}
        optimizer = call_from_json(OptimizerSpec, train["optimizer"]) if train.get("optimizer") else None
        self.optimizer: str | None = optimizer.name if optimizer else None
        self.lr: float = optimizer.lr if optimizer else 0.0
        self.seed: int = int(self.meta.get("seed", 0))
        feeds = train_step.feeds if train_step else None
        self._lr_input = feeds.lr if feeds else None
        self._step_state = feeds.step if feeds else None
        self._lr_dtype = next((n.type.dtype.numpy for n in graphs["train_step"].inputs
                               if n.attr["name"] == self._lr_input), None) if feeds else None
        self._lr_fed: tuple = (None, None)      # (self.lr, the learning-rate array made of it)
        # The train step's updates: (output, target, whether the target is optimizer state).
        self._new_values = [(u.output, u.target, u.in_state)
                            for u in train_step.updates] if train_step else []

    def _build(self, graphs: dict[str, Graph], params: dict[str, ParamInfo],
               values: dict[str, np.ndarray], preprocessing: Preprocessing | None) -> None:
        """Install the graphs and parameters and make their executors."""
        self.graphs, self.preprocessing = graphs, preprocessing
        self.param_info = params
        self.params = ParamStore(params, values, sync=self.sync)
        executor = executor_class(self.backend)
        # A train step with all-reduces runs on a compiled backend split at them (backends/split.py)
        self._executors = {key: make_executor(executor, g, self.updates(key))
                           for key, g in graphs.items()}
        if hasattr(executor, "link"):           # compiled backends build all graphs as one module
            executor.link(linkable(self._executors), *(() if self.precision == "f32" else (self.precision,)))
        self._checked_feeds: dict[tuple, dict[str, int]] = {}
        forward = graphs["forward"]
        self.inputs: dict[str, TensorType] = _user_inputs(forward)
        self.outputs: list[str] = [name for name, _ in forward.outputs]
        # Training and evaluation also take the labels the loss compares with.
        self.train_inputs = _user_inputs(graphs.get("evaluate", forward))
        # The graphs with dropout read the step's random key; the others are not given one.
        self._reads_rng = {key: any(n.attr["name"] == RNG_INPUT for n in g.inputs)
                           for key, g in graphs.items()}

    def add_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Put `preprocessing` (the train block's fitted scaling) at the feature input of every
        graph: from now on the program takes raw data, as the data set stores it, everywhere."""
        if self.preprocessing is not None:
            raise ProgramError(f"{self.name} already scales its input {self.preprocessing.input}")
        self.sync()
        try:
            graphs, infos, values = preprocessing.apply_to(self.graphs, self.param_info,
                                                           self.params._values)
        except ValueError as err:
            raise ProgramError(f"{self.name}: {err}") from None
        self._build(graphs, infos, values, preprocessing)

    def use_precision(self, precision: str) -> None:
        """Matrix products in `precision`: "f32" (IEEE, the default) or "tf32" (the cuda
        backend's f32 products on the tensor cores; see docs/cuda.md for the tolerance)."""
        if precision not in PRECISIONS:
            raise error(f"unknown precision {precision!r}", hint=f"precisions: {', '.join(PRECISIONS)}")
        if precision != "f32" and self.backend != "cuda":
            raise error(f"precision {precision} runs matrix products on a GPU's tensor cores; "
                        f"{self.name} runs on the {self.backend} backend",
                        hint="use --backend cuda, or leave the precision at f32")
        if precision != self.precision:        # only the cuda backend gets here
            self.sync()                         # the new module's device copies start from these
            executor_class("cuda").link(linkable(self._executors), precision)
            self.precision = precision

    def compile(self, load: bool = True) -> None:
        """Generate and load native code for every graph now (compiled backends otherwise do it
        at each graph's first call). With `load=False` the code is only put in the on-disk cache,
        for later processes (what `graphc build` does): a warm cache then costs no code loading."""
        for executor in self._executors.values():
            if hasattr(executor, "compile"):
                executor.compile(load)

    def cached_code(self) -> str | None:
        """The on-disk cache file (relative to the cache folder) holding this program's compiled
        code, where a backend pre-compiles into one (llvm); else None."""
        for executor in self._executors.values():
            if hasattr(executor, "cached_object"):
                return executor.cached_object()
        return None

    def updates(self, graph: str) -> tuple:
        """The updates (graphc.ir.contract.Update) that graph `graph` makes: those of the train
        step's contract for `train_step`, none for the others."""
        contract = self.train_step_contract
        return contract.updates if graph == "train_step" and contract else ()

    @property
    def graph(self) -> Graph:
        return self.graphs["forward"]

    @property
    def step(self) -> int:
        """Training steps taken so far."""
        # The step count is current on the host on every backend (the cuda one returns it).
        step = self._step_state
        return int(self._state[step]) if step in self._state else 0

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The optimizer state (moments, the step count), up to date."""
        self.sync()
        return self._state

    @state.setter
    def state(self, values: dict[str, np.ndarray]) -> None:
        self._state = values

    def sync(self) -> None:
        """Bring the host's parameters and state up to date where a device backend (cuda) holds
        newer ones; a no-op on the CPU backends."""
        for executor in self._executors.values():
            if getattr(executor, "dirty", False):
                executor.sync_to_host(self.params._values, self._state)

    def reset_state(self) -> None:
        """Optimizer state back to its initial values (moments zero, step 0)."""
        self.sync()
        self._state = {name: info.initial() for name, info in self.state_info.items()}

    def forward(self, **inputs) -> dict[str, np.ndarray]:
        feeds, dims = self._feeds(inputs, self.inputs)
        return self._executors["forward"].run(feeds, self.params._values, dims)

    def sample(self, samples: int, **inputs) -> dict[str, np.ndarray]:
        """Monte Carlo dropout: the outputs for `inputs` `samples` times with dropout on (each
        time a different mask, the same for the same seed), stacked along a new first axis.
        Their mean and spread estimate the prediction and its uncertainty."""
        if "sample" not in self.graphs:
            raise ProgramError(f"{self.name} has no dropout, so every sample would be the same")
        feeds, dims = self._feeds(inputs, self.inputs)
        runs = []
        for i in range(samples):
            # Keys from the top of the step range: never a training step's.
            feeds[RNG_INPUT] = np.int64(rng_key(self.seed, 0xFFFFFFFF - i))
            runs.append(self._executors["sample"].run(dict(feeds), self.params._values, dims))
        return {name: np.stack([r[name] for r in runs]) for name in self.outputs}

    def fit(self, x, y, *, epochs: int | None = None, batch: int | None = None,
            validation=None, callbacks=(), lr: float | None = None, seed: int | None = None):
        """Train on in-memory arrays with the train block's optimizer, schedule, early stopping
        and scaling (`graphc train`'s loop), and return the History (per-epoch metrics as
        columns). `x` holds raw samples; `validation` is (x_val, y_val), or the fraction of `x`
        held out (default: the train block's `validation`). `epochs`, `batch`, `lr` and `seed`
        override the train block; each callback gets each epoch's row (or, with Keras'
        `on_epoch_end(epoch, logs)`, is called so). Afterwards the program holds the fitted
        scaling: `predict`, `forward`, `evaluate` and `save` take raw data."""
        from graphc.runtime.fit import fit
        return fit(self, x, y, epochs=epochs, batch=batch, validation=validation,
                   callbacks=callbacks, lr=lr, seed=seed)

    def summary(self) -> str:
        """The model's inputs, outputs, loss and parameter table, as `graphc check` prints it."""
        from graphc.runtime.summary import summary
        return summary(self)

    def predict(self, x, batch: int = PREDICT_BATCH):
        """The model's output for samples `x` (raw data, as the data set stores it, where the
        program holds its preprocessing), `batch` samples at a time. A single sample without a
        batch axis gives its output without one. A model with several outputs gives a dict."""
        from graphc.runtime.fit import predict
        return predict(self, x, batch)

    def feature_input(self) -> str:
        """The input that takes the samples (the task's features; else the only input)."""
        features = (self.meta.get("task") or {}).get("features") or list(self.inputs)
        if len(features) != 1:
            raise ProgramError(f"{self.name} takes {', '.join(features)}: predict feeds one "
                               f"input; call forward with each by name")
        return features[0]

    def evaluate(self, **batch) -> dict[str, float]:
        """The loss (evaluation mode: no dropout) and, for classifiers, the accuracy."""
        out = self._run("evaluate", batch)
        scores = {"loss": float(out["loss"])}
        task = self.meta.get("task") or {}
        if task.get("kind") == "classification":
            labels = np.asarray(batch[task["labels"][0]])
            predicted = np.argmax(out[task["output"]], axis=1)
            scores["accuracy"] = float(np.mean(predicted == labels)) if len(labels) else 0.0
        return scores

    def loss_and_grads(self, **batch) -> tuple[float, dict[str, np.ndarray]]:
        """The training loss on `batch` (dropout on, keyed by the current step) and the gradient of
        every parameter. Changes nothing."""
        out = self._run("loss_and_grads", batch, rng=True)
        grads = {name: out[grad_output(name)] if grad_output(name) in out
                 else np.zeros_like(self.params[name]) for name in self.params}
        return float(out["loss"]), grads

    def train_step(self, **batch) -> float:
        """One optimizer step on exactly `batch`, with the learning rate `self.lr` (the train
        loop's schedule sets it); updates parameters and optimizer state, returns the loss."""
        return float(self.queue_train_step(**batch))

    def queue_train_step(self, **batch) -> Loss:
        """`train_step`, without waiting for it where the backend runs on a device (cuda): the
        step is queued there and its loss is read back only when `float(loss)` asks for it, so
        the host prepares the next batch while the device computes. On the CPU backends the step
        has run when this returns. A failed check raises here or when the loss is read."""
        if "train_step" not in self.graphs:
            raise ProgramError(f"{self.name} has no training step: "
                               + ("the model has no loss" if "evaluate" not in self.graphs
                                  else f"the file has no `train {self.name} {{ ... }}` block"))
        executor = self._executors["train_step"]
        extra = {self._lr_input: self._lr_array()} if self._lr_input else {}
        feeds = self._train_feeds("train_step", batch, extra)
        if getattr(executor, "queues", False):
            pending = self._device_call(executor.submit, *feeds)
            # The device advances its step count in place; the host's copy follows it, so the
            # next step's random key needs no read back.
            if self._step_state in self._state:
                self._state[self._step_state][()] += 1
            return Loss(lambda: self._device_call(pending.result)["loss"], pending.ready)
        out = executor.run(*feeds)
        state, params = self._state, self.params._values
        for name, target, is_state in self._new_values:
            if name in out:                # compiled backends update in place and return less
                (state if is_state else params)[target] = out[name]
        return Loss(float(out["loss"]))

    def step_values(self, batch: dict, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                    step: int, lr: float) -> dict:
        """Every source of the train step by name, as step `step` would read them (the batch,
        `params`, `state`, the learning rate `lr` and the step's random key), with the batch's
        dimensions under "#dims": what a reference run of that one step starts from."""
        feeds, dims = self._feeds(batch, self.train_inputs)
        values = {**feeds, **params, **state, "#dims": dims}
        if self._lr_input is not None:
            values[self._lr_input] = np.array(lr, self._lr_dtype)
        if self._reads_rng.get("train_step"):
            values[RNG_INPUT] = np.int64(rng_key(self.seed, step))
        return values

    def _device_call(self, call, *args):
        """call(*args); after a failed check on the device, the host's parameters, state and
        step count are read back (the device's are those from before the failed step)."""
        try:
            return call(*args)
        except GraphcError:
            self.sync()
            raise

    def _lr_array(self) -> np.ndarray:
        """`self.lr` as the train step's learning-rate input: made once per value (a schedule changes it
        now and then, every step reads it), read-only since every step shares it."""
        lr, array = self._lr_fed
        if lr != self.lr or array is None:
            array = np.array(self.lr, dtype=self._lr_dtype)
            array.flags.writeable = False
            self._lr_fed = (self.lr, array)
        return array

    def _run(self, graph: str, batch: dict, rng: bool = False) -> dict[str, np.ndarray]:
        feeds = self._train_feeds(graph, batch) if rng else self._graph_feeds(graph, batch)
        return self._device_call(self._executors[graph].run, *feeds)

    def _graph_feeds(self, graph: str, batch: dict) -> tuple:
        """What `graph`'s executor runs on: (feeds, parameters, dims, state)."""
        if graph not in self.graphs:
            raise ProgramError(f"{self.name} has no loss, so it cannot be {graph.replace('_', ' ')}"
                               f"{'d' if graph == 'evaluate' else ''}; declare `loss = ...`")
        feeds, dims = self._feeds(batch, self.train_inputs)
        return feeds, self.params._values, dims, self._state

    def _train_feeds(self, graph: str, batch: dict, extra: dict | None = None) -> tuple:
        """_graph_feeds for a graph in training mode: the batch is checked for batch norm, and
        the graphs with dropout get the current step's random key."""
        feeds, params, dims, state = self._graph_feeds(graph, batch)
        self._check_batch_norm(dims)
        if self._reads_rng[graph]:
            feeds[RNG_INPUT] = np.int64(rng_key(self.seed, self.step))
        if extra:
            feeds.update(extra)
        return feeds, params, dims, state

    def _check_batch_norm(self, dims: dict[str, int]) -> None:
        """A training batch must give batch norm two values per channel: one has no variance
        (PyTorch stops there too), and its running variance would divide by n - 1 = 0."""
        for shape in self.meta.get("batch_norm", ()):
            bound = bind_shape(tuple(shape), dims)
            if math.prod(d for i, d in enumerate(bound) if i != 1) < 2:
                raise ProgramError(
                    f"{self.name}: batch norm needs at least 2 values per channel in a training "
                    f"batch (it normalizes by the batch's variance); this batch gives it "
                    f"{format_shape(bound)}: train with batches of 2 or more samples")

    def _feeds(self, inputs: dict, expected: dict[str, TensorType]
               ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        shapes = tuple((k, getattr(v, "shape", None), getattr(v, "dtype", None)) for k, v in inputs.items())
        known = self._checked_feeds.get((id(expected), shapes))
        if known is not None:   # arrays of these shapes and exact dtypes were checked before
            return dict(inputs), known
        feeds, dims = self._check_feeds(inputs, expected)
        if all(isinstance(v, np.ndarray) and v.dtype == expected[k].dtype.numpy for k, v in inputs.items()):
            if len(self._checked_feeds) > 64:
                self._checked_feeds.clear()
            self._checked_feeds[(id(expected), shapes)] = dims
        return feeds, dims

    def _check_feeds(self, inputs: dict, expected: dict[str, TensorType]
                     ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        unknown = [k for k in inputs if k not in expected]
        if unknown:
            hint = did_you_mean(unknown[0], expected)
            raise ProgramError(f"{self.name} has no input {unknown[0]!r}" +
                               (f"; {hint}" if hint else f" (inputs: {', '.join(expected)})"))
        missing = [k for k in expected if k not in inputs]
        if missing:
            raise ProgramError(f"{self.name} needs input {missing[0]!r} ({expected[missing[0]]})")
        dims: dict[str, int] = {}
        origin: dict[str, str] = {}
        feeds = {}
        for name, ttype in expected.items():
            array = np.asarray(inputs[name])
            feeds[name] = _convert(name, array, ttype)
            if array.ndim != ttype.ndim:
                raise ProgramError(f"input {name} is {ttype}; got an array of shape "
                                   f"{format_shape(array.shape)} ({array.ndim} axes, not {ttype.ndim})")
            for axis, (want, got) in enumerate(zip(ttype.shape, array.shape)):
                if isinstance(want, str):
                    if want in dims and dims[want] != got:
                        raise ProgramError(f"input {name} is {ttype}; got shape "
                                           f"{format_shape(array.shape)}, but {want} is "
                                           f"{dims[want]} (from {origin[want]})")
                    dims.setdefault(want, got)
                    origin.setdefault(want, name)
                elif want != got:
                    raise ProgramError(f"input {name} is {ttype}; got shape "
                                       f"{format_shape(array.shape)} ({got} != {want} on axis {axis})")
        return feeds, dims

    def save(self, path) -> None:
        save_artifact(self, path)

    def __repr__(self) -> str:
        ins = ", ".join(f"{k}: {v}" for k, v in self.inputs.items())
        return f"<Program {self.name}({ins}) -> {', '.join(self.outputs)} on {self.backend}>"



def load_artifact(path, backend: str | None = "numpy") -> Program:
    """Restore a `Program` from an artifact folder, on `backend` (None: the one its train block's
    `device` asks for). Any problem is a `GraphcError` naming the file; nothing is read beyond the
    bounds in docs/architecture.md (runtime/artifact.py reads and checks it)."""
    return Program(**read_artifact(path, backend))

def _user_inputs(graph: Graph) -> dict[str, TensorType]:
    # The learning rate and the random key are fed by the program itself.
    return {n.attr["name"]: n.type for n in graph.inputs if n.attr["name"] not in FED_INPUTS}


def _convert(name: str, array: np.ndarray, ttype: TensorType) -> np.ndarray:
    want = ttype.dtype.numpy
    if array.dtype == want:
        return array
    ok = ((want.kind == "f" and array.dtype.kind in "fiub") or
          (want.kind in "iu" and array.dtype.kind in "iu") or
          (ttype.dtype is DType.bool and array.dtype.kind == "b"))
    if not ok:
        raise ProgramError(f"input {name} is {ttype}; got an array of dtype {array.dtype}")
    return array.astype(want)
