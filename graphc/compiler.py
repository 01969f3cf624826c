"""The compiler driver: source -> checked models -> pipeline -> a CompiledModel (graphs, the train
step's contract, parameters and state). It depends on the core alone; graphc.api makes Programs."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from graphc.autodiff import backward_graph
from graphc.errors import Diagnostic, GraphcError, SourceLoc, SourceText, did_you_mean, error
from graphc.frontend import ast
from graphc.frontend.builder import ModelBuilder, ModelIR
from graphc.frontend.calls import CALLABLE_OPS, LAYERS
from graphc.frontend.parser import parse
from graphc.frontend.search_spec import SearchConfig, check_search
from graphc.frontend.train_spec import check_train
from graphc.initializers import initialize
from graphc.ir.collective import not_a_batch_mean
from graphc.ir.contract import CompiledModel, Feeds, ParamInfo, StateInfo, TrainStep, stat_output
from graphc.ir.node import Graph, topo_order
from graphc.optim import train_step_graph
from graphc.passes import PipelineOptions, Stage, run_pipeline, train_mode
from graphc.train_config import TrainConfig


@dataclass
class CheckedFile:
    """Every model, train block and search block of a file, checked."""
    path: str
    models: dict[str, ModelIR] = field(default_factory=dict)
    trains: dict[str, TrainConfig] = field(default_factory=dict)
    searches: dict[str, SearchConfig] = field(default_factory=dict)
    src: SourceText | None = None           # for the lints: source lines and the train blocks'
    module: ast.Module | None = None        # settings as written, with their locations

    def pick(self, model: str | None) -> ModelIR:
        if model is not None:
            if model not in self.models:
                raise error(f"no model named '{model}'", file=self.path,
                            hint=did_you_mean(model, self.models) or
                            f"models here: {', '.join(self.models) or 'none'}")
            return self.models[model]
        if not self.models:
            raise error("no model in this file", file=self.path,
                        hint="declare one with `model NAME { ... }`")
        if len(self.models) > 1:
            raise error(f"the file holds {len(self.models)} models ({', '.join(self.models)}); "
                        f"choose one", file=self.path,
                        hint="pass model=NAME (or --model NAME on the command line)")
        return next(iter(self.models.values()))


def check_source(text: str, path: str = "<string>") -> CheckedFile:
    """Parse and check every model and train block; all errors of the file in one GraphcError."""
    src = SourceText(path, text)
    module = parse(text, path)
    errors: list[Diagnostic] = []
    checked = CheckedFile(path, src=src, module=module)
    _check_names(module, src, errors)
    for model in module.models:
        if model.name in checked.models:
            continue
        try:
            checked.models[model.name] = ModelBuilder(module, model, src).build()
        except GraphcError as err:
            errors.extend(err.diagnostics)
            checked.models[model.name] = None  # type: ignore[assignment]
    model_names = {m.name for m in module.models}
    for train in module.trains:
        try:
            if train.model not in model_names:
                raise src.error(f"train block for unknown model '{train.model}'", train.name_loc,
                                did_you_mean(train.model, model_names))
            if train.model in checked.trains:
                raise src.error(f"a second train block for model '{train.model}'", train.name_loc)
            checked.trains[train.model] = check_train(train, src, checked.models.get(train.model))
            _check_trainable(train, checked.models.get(train.model), src)
        except GraphcError as err:
            errors.extend(err.diagnostics)
    _check_searches(module, src, checked, model_names, errors)
    if errors:
        raise GraphcError(errors)
    return checked


def _check_trainable(train: ast.Train, model: ModelIR | None, src: SourceText) -> None:
    """A train block for a model with nothing to train: found here, not when `graphc train` runs."""
    if model is not None and model.loss is None:
        raise src.error(f"train {train.model}: model {train.model} has no loss, so there is "
                        f"nothing to train", train.name_loc,
                        f"add `loss = ...` to model {train.model} (line {model.loc.line}), for "
                        f"example loss = cross_entropy(logits, y)")


def _check_searches(module: ast.Module, src: SourceText, checked: CheckedFile,
                    model_names: set[str], errors: list[Diagnostic]) -> None:
    """A search block names a model whose train block it varies."""
    train_blocks = {t.model for t in module.trains}
    for search in module.searches:
        try:
            if search.model not in model_names:
                raise src.error(f"search block for unknown model '{search.model}'",
                                search.name_loc, did_you_mean(search.model, model_names))
            if search.model not in train_blocks:
                raise src.error(f"search block for model '{search.model}', which has no train "
                                f"block", search.name_loc,
                                f"a search varies the train block: add `train {search.model} "
                                f"{{ optimizer = adam(lr=1e-3) }}`")
            if search.model in checked.searches:
                raise src.error(f"a second search block for model '{search.model}'",
                                search.name_loc)
            if search.model in checked.trains:     # else its train block's errors are reported
                checked.searches[search.model] = check_search(search, src,
                                                              checked.trains[search.model])
        except GraphcError as err:
            errors.extend(err.diagnostics)


def _check_names(module: ast.Module, src: SourceText, errors: list[Diagnostic]) -> None:
    seen: dict[str, SourceLoc] = {}
    for kind, items in (("model", module.models), ("function", module.defs)):
        for item in items:
            if item.name in seen:
                errors.append(src.diagnostic(
                    f"{kind} '{item.name}' is already defined at line {seen[item.name].line}",
                    item.name_loc))
            seen[item.name] = item.loc
    builtin = set(LAYERS) | set(CALLABLE_OPS) | {"dropout"}
    for d in module.defs:
        if d.name in builtin:
            errors.append(src.diagnostic(f"function '{d.name}' would hide the built-in {d.name}",
                                         d.name_loc, "choose another name"))
        if len(set(d.params)) != len(d.params):
            errors.append(src.diagnostic(f"function '{d.name}' repeats a parameter name", d.loc))


def model_graph(model: ModelIR, include_loss: bool = True) -> Graph:
    """The model as written (composite ops), outputs and loss."""
    outputs = tuple(model.outputs.items())
    if include_loss and model.loss is not None:
        outputs += (("loss", model.loss),)
    return Graph(model.name, outputs, "eval")


def lower(graph: Graph, options: PipelineOptions | None = None) -> Graph:
    """A graph that may still be differentiated (a model's, the training graph) through the
    pipeline."""
    return run_pipeline(graph, options)


def lower_derived(graph: Graph, options: PipelineOptions | None = None) -> Graph:
    """A graph autodiff derived (loss_and_grads, train_step) through the pipeline's
    after-autodiff stage."""
    return run_pipeline(graph, replace(options or PipelineOptions(), stage=Stage.AFTER_AUTODIFF))


def compile_model(checked: CheckedFile, model: str | None = None, seed: int | None = None,
                  options: PipelineOptions | None = None, ranks: int = 1) -> CompiledModel:
    """The compiled `model` of a checked file: its lowered graphs, the train step's contract, and
    its parameters initialized with `seed` (None: its train block's seed, else 0). `ranks` > 1:
    the train step of one of that many data-parallel processes (graphc.runtime.distributed)."""
    ir = checked.pick(model)
    train = checked.trains.get(ir.name)
    if seed is None:
        seed = train.seed if train else 0
    if ranks > 1 and ir.loss is not None:
        _check_batch_mean(checked, ir.loss, ranks)
    graphs, state, train_step = program_graphs(ir, train, options, ranks)
    infos = {name: ParamInfo(name, p.type, p.role, p.init) for name, p in ir.params.items()}
    values = {name: _initialize(checked, p, seed) for name, p in ir.params.items()}
    meta = {"source": checked.path, "seed": seed, "task": task_of(ir)}
    norms = [list(node.inputs[0].shape) for node in ir.stats.values() if node.attr["stat"] == "mean"]
    if norms:
        meta["batch_norm"] = norms     # the shapes it normalizes, for Program's batch-of-1 check
    if train is not None:
        meta["train"] = train.to_json()
    if ranks > 1:
        meta["ranks"] = ranks
    return CompiledModel(ir.name, graphs, infos, values, state, meta, train_step)


def _check_batch_mean(checked: CheckedFile, loss, ranks: int) -> None:
    """Refuse, at the loss, a loss that is not a mean over the batch for a data-parallel train
    step: the ranks' gradients are averaged, which gives one process's gradient only for one."""
    term = not_a_batch_mean(loss)
    if term is None:
        return
    where = loss.loc or term.loc
    text = checked.src.line(where.line) if checked.src and where else None
    what = f"its term {term.op}(...)" if term is not loss else f"it is a {term.op}(...)"
    raise GraphcError(Diagnostic(
        f"data-parallel training averages the {ranks} ranks' gradients; this loss is not a mean "
        f"over the batch ({what}): their mean is not one process's gradient",
        where, "write the loss as a mean over the batch: a built-in loss (cross_entropy, nll, mse, "
        "binary_cross_entropy_with_logits) or mean(...), plus terms that do not read the batch "
        "such as 1e-4 * l2(weights); or train on one process", "error", text))


def _initialize(checked: CheckedFile, p, seed: int):
    """A parameter's starting value; a problem reading an `npz` initializer's archive is
    reported at the parameter's declaration."""
    try:
        return initialize(p.name, p.type.shape, p.type.dtype.numpy, p.init, seed,
                          Path(checked.path).parent)
    except GraphcError as err:
        d = err.diagnostics[0]
        where = f" ({d.file})" if d.file else ""
        text = checked.src.line(p.loc.line) if checked.src else None
        raise GraphcError(Diagnostic(f"param {p.name}: {d.message}{where}", p.loc, d.hint,
                                     "error", text)) from None


def program_graphs(ir: ModelIR, train: TrainConfig | None, options: PipelineOptions | None = None,
                   ranks: int = 1) -> tuple[dict[str, Graph], dict[str, StateInfo], TrainStep | None]:
    """The lowered graphs of a model: `forward` (outputs), `sample` (the outputs with dropout on,
    where the model has dropout), and where there is a loss `evaluate` (outputs and loss),
    `loss_and_grads` (training mode) and, with a train block, `train_step` (forward, backward
    and the optimizer's updates in one graph); with the optimizer state and the train step's
    contract (None without a train block)."""
    graphs = {"forward": lower(model_graph(ir, include_loss=False), options)}
    sampling = train_mode(model_graph(ir, include_loss=False), frozenset({"dropout"}))
    if sampling.nodes() != graphs["forward"].nodes() and any(
            n.op == "dropout" for n in sampling.nodes()):
        # The outputs with dropout on, for Monte Carlo dropout (Program.sample).
        graphs["sample"] = lower(sampling, options)
    state: dict[str, StateInfo] = {}
    if ir.loss is None:
        return graphs, state, None
    graphs["evaluate"] = lower(model_graph(ir), options)
    # Batch norm's running statistics are outputs of the training graph (`stat NAME`): the
    # train step stores them, computed from the same batch statistics the loss normalizes by.
    stats = tuple((stat_output(name), node) for name, node in ir.stats.items())
    training = lower(train_mode(Graph(ir.name, (("loss", ir.loss),) + stats)), options)
    graphs["loss_and_grads"] = lower_derived(backward_graph(training), options)
    if train is not None:
        roles = {name: (p.type, p.role) for name, p in ir.params.items() if p.role != "stat"}
        step, contract, specs = train_step_graph(training, train.optimizer, roles, tuple(ir.stats),
                                                 train.clip_grad_value, train.clip_grad_norm, ranks)
        graphs["train_step"] = lower_derived(step, options)
        state = {name: StateInfo(name, t, init) for name, (t, init) in specs.items()}
        # Lowering keeps the outputs; the feeds are those the lowered graph reads.
        contract = replace(contract, feeds=Feeds.of(graphs["train_step"], state))
        return graphs, state, contract
    return graphs, state, None


def task_of(ir: ModelIR) -> dict:
    """Which inputs are features and which are labels (used by the loss only), and what kind of
    prediction the first output is: what `graphc train`, `eval` and `predict` need to know."""
    if ir.loss is None:
        return {"features": list(ir.inputs), "labels": [], "kind": None}
    seen_by_outputs = {n.attr["name"] for out in ir.outputs.values()
                       for n in topo_order([out]) if n.op == "input"}
    labels = [name for name in ir.inputs if name not in seen_by_outputs]
    task = {"features": [n for n in ir.inputs if n in seen_by_outputs], "labels": labels,
            "kind": None}
    if len(labels) == 1 and ir.outputs:
        label = ir.inputs[labels[0]]
        out_name, out = next(iter(ir.outputs.items()))
        if label.dtype.is_int and out.type.ndim == 2:
            kind = {"log_softmax": "log_probabilities", "softmax": "probabilities"}
            task.update(kind="classification", output=out_name,
                        scores=kind.get(out.op, "logits"))
        elif label.dtype.is_float:
            task.update(kind="regression", output=out_name)
    return task


def read_source(path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig")   # a byte-order mark, as Python allows
    except FileNotFoundError:
        raise error("no such file", file=path) from None
    except IsADirectoryError:
        raise error("is a folder, not a .nn file", file=path) from None
    except UnicodeDecodeError:
        raise _not_utf8(path, p.read_bytes()) from None
    except OSError as err:
        raise error(f"cannot read: {err.strerror}", file=path) from None


def _not_utf8(path, data: bytes) -> GraphcError:
    """The first byte that is not UTF-8, by line and column (as Python reports it)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start
    else:       # the file changed under us: no byte to point at
        return error("not a text file (it is not valid UTF-8)", file=path)
    start = data.rfind(b"\n", 0, bad) + 1
    end = data.find(b"\n", bad)
    line_text = data[start:len(data) if end < 0 else end].decode("utf-8", "replace")
    col = len(data[start:bad].decode("utf-8", "replace")) + 1
    loc = SourceLoc(str(path), data.count(b"\n", 0, bad) + 1, col)
    return error(f"not valid UTF-8: the byte 0x{data[bad]:02x} cannot be read as text", loc,
                 "a .nn file is text in UTF-8; save it in that encoding", line_text=line_text)
