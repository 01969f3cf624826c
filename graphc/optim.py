"""Optimizers as graph builders: for every parameter, the expression of its new value and of its
new optimizer state (PyTensor-style `updates`), following PyTorch's documented update rules.

The learning rate is an input of the train-step graph (`LR_INPUT`), so schedules never recompile;
the step count is optimizer state (`STEP_STATE`), advanced by the same graph. Weight decay applies
to parameters whose role is `weight` only: biases and other parameters are never decayed. What the
step updates is recorded as its contract (graphc.ir.contract.TrainStep), not left in names.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from graphc.autodiff import derive_backward
from graphc.ir import ops as op_table
from graphc.ir.contract import (
    LR_INPUT,
    STEP_STATE,
    Feeds,
    TrainStep,
    Update,
    UpdateKind,
    new_output,
    stat_output,
    state_name,
)
from graphc.ir.emit import Emit
from graphc.ir.node import Graph, Node
from graphc.ir.types import DType, TensorType
from graphc.options import NONNEGATIVE, Opt, fraction, positive
from graphc.train_config import OptimizerSpec

UPDATE = frozenset({"update"})


@dataclass
class Updates:
    """What an optimizer builds: new values by target (a parameter or a state slot), what each
    is (its contract entry), and the state slots it reads, each with its type and initial fill
    value."""
    new: dict[str, Node] = field(default_factory=dict)
    kinds: dict[str, Update] = field(default_factory=dict)
    state: dict[str, tuple[TensorType, float]] = field(default_factory=dict)

    def add(self, update: Update, node: Node) -> None:
        self.new[update.target] = node
        self.kinds[update.target] = update


@dataclass(frozen=True)
class Optimizer:
    """One optimizer, declared once: its option schema (in positional order, with defaults and
    ranges: what a train block's call is checked against), its builder (the formulas, called as
    build(param, **options)), a doc line, and the combinations of options it refuses."""
    name: str
    doc: str
    options: dict[str, Opt]
    build: Callable[..., Node]
    refuse: Callable[[dict], tuple[str, str] | None] | None = None    # -> (why, hint) or None


OPTIMIZERS: dict[str, Optimizer] = {}


def optimizer(name: str, doc: str, refuse=None, **options: Opt):
    """Declares the decorated builder as optimizer `name` with `options`."""
    def register(build: Callable[..., Node]) -> Callable[..., Node]:
        assert name not in OPTIMIZERS, f"internal error: optimizer {name} declared twice"
        OPTIMIZERS[name] = Optimizer(name, doc, dict(options), build, refuse)
        return build
    return register


@dataclass
class _Param:
    """One parameter being updated, and helpers to build its formulas."""
    node: Node
    grad: Node
    role: str
    lr: Node
    step: Node          # the new step count t (1 on the first update), in the parameter's dtype
    updates: Updates

    def __post_init__(self):
        self.e = Emit(self.node.loc, UPDATE)
        self.name = self.node.attr["name"]

    def c(self, value: float) -> Node:
        return self.e.const(float(value), self.node.dtype)

    def slot(self, slot: str, init: float = 0.0) -> Node:
        """A state tensor shaped like the parameter (velocity, moments, accumulators)."""
        name = state_name(self.name, slot)
        self.updates.state[name] = (self.node.type, init)
        return op_table.source("state", self.node.type, loc=self.node.loc, name=name)

    def set(self, slot: str, value: Node) -> None:
        target = state_name(self.name, slot)
        self.updates.add(Update(new_output(target), target, UpdateKind.SLOT, self.name, slot),
                         value.relabeled(name=target))

    def lerp(self, old: Node, new: Node, keep: float) -> Node:
        """keep * old + (1 - keep) * new: the exponential moving averages of RMSProp and Adam."""
        e = self.e
        return e("add", e("mul", self.c(keep), old), e("mul", self.c(1.0 - keep), new))

    def decayed_grad(self, weight_decay: float) -> Node:
        """g + weight_decay * p (L2 folded into the gradient), for weights only."""
        if weight_decay == 0.0 or self.role != "weight":
            return self.grad
        return self.e("add", self.grad, self.e("mul", self.c(weight_decay), self.node))

    def descend(self, direction: Node, scale: Node | None = None) -> Node:
        """p - lr * scale * direction."""
        e = self.e
        lr = self.lr if scale is None else e("mul", self.lr, scale)
        return e("sub", self.node, e("mul", lr, direction))


def _nesterov_needs_momentum(o: dict) -> tuple[str, str] | None:
    if o["nesterov"] and (o["momentum"] == 0 or o["dampening"]):
        return ("Nesterov momentum needs a momentum and zero dampening",
                "for example sgd(lr=0.01, momentum=0.9, nesterov=true)")
    return None


@optimizer("sgd", "stochastic gradient descent, with momentum, Nesterov momentum and dampening "
           "(torch.optim.SGD)", _nesterov_needs_momentum,
           lr=positive(required=True), momentum=fraction(0.0), nesterov=Opt("bool", False),
           weight_decay=NONNEGATIVE, dampening=fraction(0.0, open_high=False))
def _sgd(p: _Param, lr, momentum, nesterov, weight_decay, dampening) -> Node:
    e, g = p.e, p.decayed_grad(weight_decay)
    if momentum == 0.0:
        return p.descend(g)
    buf = p.slot("momentum_buffer")
    new_buf = e("add", e("mul", p.c(momentum), buf), e("mul", p.c(1.0 - dampening), g))
    if dampening != 0.0:
        # PyTorch starts the buffer at the first gradient itself, undamped.
        new_buf = e("where", e("equal", p.step, p.c(1.0)), g, new_buf)
    p.set("momentum_buffer", new_buf)
    direction = e("add", g, e("mul", p.c(momentum), new_buf)) if nesterov else new_buf
    return p.descend(direction)


@optimizer("adagrad", "per-element steps scaled by the root of the summed squared gradients "
           "(torch.optim.Adagrad)",
           lr=positive(required=True), eps=positive(default=1e-10),
           initial_accumulator=NONNEGATIVE, weight_decay=NONNEGATIVE)
def _adagrad(p: _Param, lr, eps, initial_accumulator, weight_decay) -> Node:
    e, g = p.e, p.decayed_grad(weight_decay)
    total = e("add", p.slot("sum", initial_accumulator), e("mul", g, g))
    p.set("sum", total)
    return p.descend(e("div", g, e("add", e("sqrt", total), p.c(eps))))


@optimizer("rmsprop", "per-element steps scaled by a moving average of squared gradients "
           "(torch.optim.RMSprop)",
           lr=positive(required=True), alpha=fraction(0.99), eps=positive(default=1e-8),
           momentum=fraction(0.0), centered=Opt("bool", False), weight_decay=NONNEGATIVE)
def _rmsprop(p: _Param, lr, alpha, eps, momentum, centered, weight_decay) -> Node:
    e, g = p.e, p.decayed_grad(weight_decay)
    square_avg = p.lerp(p.slot("square_avg"), e("mul", g, g), alpha)
    p.set("square_avg", square_avg)
    variance = square_avg
    if centered:
        grad_avg = p.lerp(p.slot("grad_avg"), g, alpha)
        p.set("grad_avg", grad_avg)
        variance = e("sub", square_avg, e("mul", grad_avg, grad_avg))
    step = e("div", g, e("add", e("sqrt", variance), p.c(eps)))
    if momentum > 0.0:
        buf = e("add", e("mul", p.c(momentum), p.slot("momentum_buffer")), step)
        p.set("momentum_buffer", buf)
        step = buf
    return p.descend(step)


@optimizer("adam", "moving averages of the gradient and its square, bias-corrected "
           "(torch.optim.Adam)",
           lr=positive(required=True), beta1=fraction(0.9), beta2=fraction(0.999),
           eps=positive(default=1e-8), weight_decay=NONNEGATIVE, amsgrad=Opt("bool", False))
def _adam(p: _Param, lr, beta1, beta2, eps, weight_decay, amsgrad=False, decoupled=False) -> Node:
    e = p.e
    param = p.node
    if decoupled and weight_decay != 0.0 and p.role == "weight":
        # AdamW: shrink the weight first, outside the adaptive step.
        param = e("mul", param, e("sub", p.c(1.0), e("mul", p.lr, p.c(weight_decay))))
    g = p.grad if decoupled else p.decayed_grad(weight_decay)
    m = p.lerp(p.slot("exp_avg"), g, beta1)
    v = p.lerp(p.slot("exp_avg_sq"), e("mul", g, g), beta2)
    p.set("exp_avg", m)
    p.set("exp_avg_sq", v)
    if amsgrad:
        v = e("maximum", p.slot("max_exp_avg_sq"), v)
        p.set("max_exp_avg_sq", v)
    bias1 = e("sub", p.c(1.0), e("pow", p.c(beta1), p.step))
    root2 = e("sqrt", e("sub", p.c(1.0), e("pow", p.c(beta2), p.step)))
    # PyTorch's step, lr / bias1 * m / (sqrt(v) / root2 + eps), with root2 moved into the
    # scalars: lr * root2 / bias1 * m / (sqrt(v) + eps * root2). The same number up to rounding,
    # one pass over the parameter fewer.
    denom = e("add", e("sqrt", v), e("mul", p.c(eps), root2))
    direction = e("div", m, denom)
    return e("sub", param, e("mul", e("div", e("mul", p.lr, root2), bias1), direction))


@optimizer("adamw", "Adam with decoupled weight decay (torch.optim.AdamW)",
           lr=positive(required=True), beta1=fraction(0.9), beta2=fraction(0.999),
           eps=positive(default=1e-8), weight_decay=Opt("float", 0.01, low=0))
def _adamw(p: _Param, lr, beta1, beta2, eps, weight_decay) -> Node:
    return _adam(p, lr, beta1, beta2, eps, weight_decay, decoupled=True)


def build_updates(optimizer: OptimizerSpec, params: list[tuple[Node, Node, str]]) -> Updates:
    """Updates for `params`, a list of (param node, gradient node, role)."""
    name, options = optimizer.name, optimizer.options
    rule = OPTIMIZERS[name].build
    updates = Updates()
    step = op_table.source("state", TensorType(DType.i64, ()), name=STEP_STATE)
    new_step = op_table.apply("add", [step, op_table.source("const", step.type, value=1)],
                              tags=UPDATE, name=STEP_STATE)
    updates.state[STEP_STATE] = (step.type, 0)
    updates.add(Update(new_output(STEP_STATE), STEP_STATE, UpdateKind.STEP), new_step)
    lr_dtype = max((p.dtype for p, _, _ in params), key=lambda d: d.numpy.itemsize,
                   default=DType.f32)
    lr = op_table.source("input", TensorType(lr_dtype, ()), name=LR_INPUT)
    for node, grad, role in params:
        e = Emit(node.loc, UPDATE)
        node_lr = lr if lr.dtype == node.dtype else e("cast", lr, dtype=node.dtype.value)
        p = _Param(node, grad, role, node_lr, e("cast", new_step, dtype=node.dtype.value), updates)
        new_value = rule(p, **options)
        assert new_value.type == node.type, f"internal error: {name} changes the type of {p.name}"
        updates.add(Update(new_output(p.name), p.name, UpdateKind.PARAM, p.name),
                    new_value.relabeled(name=p.name))
    return updates


def train_step_graph(training: Graph, optimizer: OptimizerSpec,
                     params: dict[str, tuple[TensorType, str]], stats: Sequence[str] = (),
                     clip_value: float | None = None, clip_norm: float | None = None,
                     ranks: int = 1
                     ) -> tuple[Graph, TrainStep, dict[str, tuple[TensorType, float]]]:
    """One graph for a whole training step: the loss of `training` (a lowered training-mode
    graph whose running statistics `stats` are the outputs `stat_output(NAME)`), every parameter's
    gradient (clipped by value, then by global norm, where asked), and the optimizer's updates,
    as outputs `loss` and `new_output(TARGET)`. Built for `ranks` > 1 data-parallel processes,
    the gradients, new running statistics and loss are averaged across them first
    (`reduce_across_ranks`). Returns it with its contract and the optimizer state it reads
    (name -> type, initial value)."""
    loss = training.output_map["loss"]
    present = {n.attr["name"]: n for n in training.params}
    nodes = [present.get(name) or op_table.source("param", t, name=name)
             for name, (t, _) in params.items()]
    grads = derive_backward(loss, nodes)
    new_stats = {name: training.output_map[stat_output(name)] for name in stats}
    if ranks > 1:
        keys = [("grad", n) for n in nodes] + [("stat", s) for s in stats] + [("loss", None)]
        reduced = reduce_across_ranks([grads[n] for n in nodes] + list(new_stats.values()) + [loss])
        by_key = dict(zip(keys, reduced))
        grads = {n: by_key["grad", n] for n in nodes}
        new_stats = {s: by_key["stat", s] for s in stats}
        loss = by_key["loss", None]
    grads = clip_gradients(grads, clip_value, clip_norm)
    updates = build_updates(optimizer, [(n, grads[n], params[n.attr["name"]][1]) for n in nodes])
    contract = tuple(updates.kinds[k] for k in updates.new)
    contract += tuple(Update(new_output(name), name, UpdateKind.STAT, name) for name in stats)
    new = {**updates.new, **new_stats}
    outputs = (("loss", loss),) + tuple((u.output, new[u.target]) for u in contract)
    graph = Graph(f"{training.name}.train_step", outputs, "train")
    return graph, TrainStep("loss", contract, Feeds.of(graph, updates.state)), updates.state


def reduce_across_ranks(values: Sequence[Node]) -> list[Node]:
    """`values` averaged across the ranks of a data-parallel run: flattened into one buffer per
    dtype (one all-reduce, one MPI call, per step, not one per tensor), reduced, and cut back
    into each value's shape. Each rank's loss is the mean over its equal shard of the global
    batch, so the mean of the ranks' gradients is the gradient of the global batch's loss."""
    e = Emit(None, UPDATE)
    out: list[Node | None] = [None] * len(values)
    for dtype in dict.fromkeys(v.dtype for v in values):
        group = [i for i, v in enumerate(values) if v.dtype == dtype]
        flat = [e("reshape", values[i], shape=(values[i].type.size(),)) for i in group]
        buffer = flat[0] if len(flat) == 1 else e("concat", *flat, axis=0)
        reduced = op_table.apply("all_reduce", [buffer], {"op": "mean"}, tags=UPDATE)
        start = 0
        for i in group:
            size = values[i].type.size()
            piece = e("slice", reduced, axis=0, start=start, stop=start + size)
            out[i] = e("reshape", piece, shape=values[i].shape)
            start += size
    return out


def clip_gradients(grads: dict[Node, Node], value: float | None, norm: float | None
                   ) -> dict[Node, Node]:
    """PyTorch's clip_grad_value_ (each element into [-value, value]) and clip_grad_norm_ (all
    gradients scaled by min(1, norm / (global L2 norm + 1e-6))), as graph nodes."""
    def const(x: float, like: Node) -> Node:
        return op_table.source("const", TensorType(like.type.dtype, ()), value=x)
    if value is not None:
        grads = {p: op_table.apply("minimum", [op_table.apply("maximum", [g, const(-value, g)]),
                                               const(value, g)], tags=UPDATE)
                 for p, g in grads.items()}
    if norm is not None and grads:
        first = next(iter(grads.values()))
        squares = [op_table.apply("sum", [op_table.apply("mul", [g, g])]) for g in grads.values()]
        squares = [s if s.type.dtype is first.type.dtype else
                   op_table.apply("cast", [s], {"dtype": first.type.dtype.value}) for s in squares]
        total = squares[0]
        for s in squares[1:]:
            total = op_table.apply("add", [total, s])
        coef = op_table.apply("div", [const(norm, first),
                                      op_table.apply("add", [op_table.apply("sqrt", [total]),
                                                             const(1e-6, first)])])
        scale = op_table.apply("minimum", [coef, const(1.0, first)])
        grads = {p: op_table.apply("mul", [g, scale if g.type.dtype is first.type.dtype else
                                           op_table.apply("cast", [scale], {"dtype": g.type.dtype.value})],
                                   tags=UPDATE)
                 for p, g in grads.items()}
    return grads
