"""Lints that teach: mistakes the course warns about, found in a checked file before anything
trains. Each is a warning at the place it is written, with a one-line why; `--Werror` makes them
errors. Rules read the checked model IR (as written, composites included) and the train blocks.
"""
from __future__ import annotations

from collections.abc import Callable

from graphc.compiler import CheckedFile
from graphc.errors import Diagnostic, SourceLoc
from graphc.frontend import ast
from graphc.frontend.builder import ModelIR
from graphc.ir.node import Node, topo_order
from graphc.train_config import TrainConfig

SQUASHING = ("sigmoid", "tanh")
DEEP_SQUASHING = 4         # more sigmoid/tanh layers than this in a row: gradients vanish
ADAM_LR = 1e-2
DEEP_NET = 3               # weight matrices from which a net counts as deep for plain SGD


def lint(checked: CheckedFile) -> list[Diagnostic]:
    """Every lint warning of the file, in source order."""
    found: list[tuple[SourceLoc | None, str, str, str]] = []   # (loc, message, why, kind)
    for model in checked.models.values():
        if model is not None:
            for rule in MODEL_RULES:
                found.extend(rule(model))
    trains = {t.model: t for t in (checked.module.trains if checked.module else [])}
    for name, config in checked.trains.items():
        model = checked.models.get(name)
        if model is not None and name in trains:
            found.extend(_train_rules(model, config, trains[name]))
    src = checked.src
    out = []
    for loc, message, why, kind in sorted(found, key=lambda f: (f[0].line, f[0].col) if f[0] else (0, 0)):
        severity = "warning" if kind == "warning" else "advice"
        d = (src.diagnostic(message, loc, why, severity) if src is not None
             else Diagnostic(message, loc, why, severity))
        out.append(d)
    return out


# --- model rules --------------------------------------------------------------------------------

def _constant_weights(model: ModelIR):
    """A constant weight matrix whose layer feeds another weight layer: its hidden units stay
    identical. (A last layer may start at zero: each output has its own target.)"""
    weights = {name for name, p in model.params.items() if p.role == "weight"}
    feeding: set[str] = set()       # weights upstream of another weight's matrix product
    upstream: dict[int, set[str]] = {}
    for node in _nodes(model, with_loss=False):
        ups = set().union(*(upstream[id(i)] for i in node.inputs)) if node.inputs else set()
        if node.op == "param" and node.attr["name"] in weights:
            ups = {node.attr["name"]}
        if node.op in ("matmul", "linear") and any(
                i.op == "param" and i.attr["name"] in weights for i in node.inputs):
            for i in node.inputs:
                if not (i.op == "param" and i.attr["name"] in weights):
                    feeding |= upstream[id(i)]
        upstream[id(node)] = ups
    for p in model.params.values():
        init = p.init[0]
        if p.name in feeding and p.type.ndim >= 2 and init in ("zeros", "ones", "constant"):
            yield (p.loc, f"weight {p.name} starts as a constant ({init})",
                   "every hidden unit of its layer then computes the same thing and gets the same "
                   "gradient, so they never become different; use kaiming() for ReLU layers, "
                   "xavier() for tanh or sigmoid", "warning")


def _regularized_bias(model: ModelIR):
    if model.loss is None:
        return
    for node in topo_order([model.loss]):
        if node.op in ("l1", "l2"):
            for arg in node.inputs:
                spec = model.params.get(arg.attr["name"]) if arg.op == "param" else None
                if spec is not None and spec.role == "bias":
                    yield (node.loc, f"{node.op} penalizes the bias {spec.name}",
                           "biases only shift a unit's output and do not overfit; penalizing them "
                           "pulls the units towards zero output for nothing: regularize weights "
                           "(l2(weights))", "warning")


def _log_of_softmax(model: ModelIR):
    for node in _nodes(model):
        if node.op == "log" and node.inputs[0].op == "softmax":
            yield (node.loc, "log(softmax(x)) written out",
                   "softmax underflows to 0 for unlikely classes and log(0) = -inf; log_softmax(x) "
                   "computes the same thing stably", "warning")


LOGIT_LOSSES = {"cross_entropy": ("softmax",), "bce_with_logits": ("sigmoid",)}


def _squashed_logits(model: ModelIR):
    for node in _nodes(model):
        squash = LOGIT_LOSSES.get(node.op)
        if squash and node.inputs[0].op in squash:
            yield (node.loc, f"{node.op} is given {node.inputs[0].op}(...), not logits",
                   f"{node.op} applies {squash[0]} itself; applying it twice squashes the scores "
                   f"and slows learning: pass the raw scores", "warning")


def _deep_squashing(model: ModelIR):
    """The longest chain of sigmoid/tanh activations through the forward graph."""
    depth: dict[int, int] = {}
    for node in _nodes(model, with_loss=False):
        below = max((depth[id(i)] for i in node.inputs), default=0)
        depth[id(node)] = below + (node.op in SQUASHING)
        if node.op in SQUASHING and depth[id(node)] == DEEP_SQUASHING + 1:
            yield (node.loc, f"{DEEP_SQUASHING + 1} sigmoid/tanh layers in a row",
                   "their derivatives are at most 1 (sigmoid: 1/4), so gradients shrink with "
                   "every layer and the first ones stop learning: prefer relu with kaiming() "
                   "initialization", "advice")


def _dropout_before_regression_output(model: ModelIR):
    if model.loss is None:
        return
    for name, out in model.outputs.items():
        labels = [n for n in topo_order([model.loss]) if n.op == "input"
                  and n.attr["name"] not in _inputs_of(out)]
        regression = labels and all(n.type.dtype.is_float for n in labels)
        if regression and out.op == "dropout":
            yield (out.loc, f"dropout right before the output {name} of a regression",
                   "zeroing outputs at random adds noise to every prediction the loss sees; "
                   "put dropout between hidden layers", "advice")


def _nodes(model: ModelIR, with_loss: bool = True) -> list[Node]:
    roots = list(model.outputs.values()) + ([model.loss] if with_loss and model.loss else [])
    return topo_order(roots)


def _inputs_of(node: Node) -> set[str]:
    return {n.attr["name"] for n in topo_order([node]) if n.op == "input"}


MODEL_RULES: list[Callable] = [_constant_weights, _regularized_bias, _log_of_softmax,
                               _squashed_logits, _deep_squashing, _dropout_before_regression_output]


# --- train-block rules --------------------------------------------------------------------------

def _train_rules(model: ModelIR, config: TrainConfig, train: ast.Train):
    written = {s.name: s for s in train.settings}
    if "seed" not in written:
        yield (train.name_loc, f"train {train.model} sets no seed",
               "graphc then uses seed 0, which the file does not say: write the seed (seed = 0) so "
               "that a rerun or a search knows what it reproduces or varies", "warning")
    name, options = config.optimizer.name, config.optimizer.options
    where = written["optimizer"].loc if "optimizer" in written else train.name_loc
    lr = options.get("lr")
    if name in ("adam", "adamw") and lr is not None and lr > ADAM_LR:
        yield (where, f"{name} with lr={lr:g}",
               f"Adam's steps are about lr in size whatever the gradient; above {ADAM_LR:g} they "
               "usually overshoot: start from 1e-3", "advice")
    norms = [n for n in _nodes(model) if n.op == "batch_norm"]
    if config.batch == 1 and norms:
        where_batch = written["batch"].loc if "batch" in written else train.name_loc
        yield (where_batch, "batch = 1 with batch norm (line "
               + ", ".join(str(n.loc.line) for n in norms if n.loc) + ")",
               "batch norm normalizes by each training batch's own statistics: one sample has no "
               "variance over [N, C] features (training stops with an error) and only its own over "
               "images; use batches of 16 or more, or layernorm()", "advice")
    weights = sum(1 for p in model.params.values() if p.role == "weight" and p.type.ndim >= 2)
    if name == "sgd" and not options.get("momentum") and weights >= DEEP_NET:
        yield (where, f"sgd without momentum on a net of {weights} weight matrices",
               "plain SGD crawls through the flat, narrow valleys of deep nets; momentum=0.9 (or "
               "adam) gets through them much faster", "advice")
