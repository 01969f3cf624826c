"""AST -> IR: evaluates a model's statements into typed IR nodes, creating parameters for layers,
naming them after where they are used, inferring parameter roles, and collecting every error
(a failed statement poisons its name, so one mistake is reported once, not at each later use).
Over 500 lines: ModelBuilder is one evaluator whose methods share its scopes, parameters and
collected errors (the layers and role inference are already apart, in calls.py and params.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from graphc.errors import Diagnostic, GraphcError, SourceLoc, SourceText, did_you_mean
from graphc.frontend import ast
from graphc.frontend.calls import (
    CALLABLE_OPS,
    LAYERS,
    ArgError,
    DimName,
    bind_op_args,
    convert_attr,
    unknown_dtype,
)
from graphc.frontend.limits import MAX_EVALUATIONS, MAX_INT, MAX_NESTING, MAX_PARAM_BYTES
from graphc.frontend.params import Scope, count_param_sites, infer_roles, param_functions
from graphc.frontend.transform import label_span
from graphc.frontend.values import POISON, DTypeValue, ListValue, ParamSet, Poisoned, Scalar, Tensor, describe
from graphc.initializers import INITIALIZERS, npz_path_problem
from graphc.ir import ops as op_table
from graphc.ir.node import Node
from graphc.ir.ops import Attr, TypeError_
from graphc.ir.types import DTYPE_NAMES, DType, TensorType, shape_problem

ROLES = ("weight", "bias", "other")
_FOLD = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "div": lambda a, b: a / b, "pow": lambda a, b: a ** b,
         "greater": lambda a, b: a > b, "greater_equal": lambda a, b: a >= b,
         "less": lambda a, b: a < b, "less_equal": lambda a, b: a <= b,
         "equal": lambda a, b: a == b, "not_equal": lambda a, b: a != b}


@dataclass
class ParamSpec:
    name: str
    type: TensorType
    init: tuple                 # (initializer, ((option, value), ...))
    role: str | None            # None until inferred
    loc: SourceLoc
    node: Node
    explicit_role: bool = False


@dataclass
class ModelIR:
    """A checked model: its outputs, loss, parameters and inputs, all as IR."""
    name: str
    outputs: dict[str, Node]
    loss: Node | None
    params: dict[str, ParamSpec]
    inputs: dict[str, Node]
    loc: SourceLoc
    # Parameters a training step sets rather than the optimizer (batch norm's running
    # statistics, role "stat"): each one's new value, computed from the training batch.
    stats: dict[str, Node] = field(default_factory=dict)


class ModelBuilder:
    def __init__(self, module: ast.Module, model: ast.Model, src: SourceText):
        self.module, self.model, self.src = module, model, src
        self.defs = {d.name: d for d in module.defs}
        self.param_functions = param_functions(self.defs)
        self.env: dict[str, object] = {}
        self.declared: dict[str, SourceLoc] = {}
        self.dims: set[str] = set()
        self.params: dict[str, ParamSpec] = {}
        self.inputs: dict[str, Node] = {}
        self.outputs: dict[str, Node] = {}
        self.loss: Node | None = None
        self.stats: dict[str, Node] = {}
        self.errors: list[Diagnostic] = []
        self.frames: list[Scope] = []
        self.scope_uses: dict[str, int] = {}
        self.def_stack: list[str] = []
        self.param_sets: list[tuple[ast.Var, str, tuple[str, ...]]] = []
        self.random_streams = 0     # each dropout site draws its own stream of random numbers
        self.depth = 0              # how deeply eval is nested, through user functions too
        self.evaluations = 0
        self.param_bytes = 0

    # --- driving ----------------------------------------------------------------------------------

    def build(self) -> ModelIR:
        for stmt in self.model.stmts:
            try:
                self.statement(stmt)
            except GraphcError as err:
                self.errors.extend(err.diagnostics)
                self.poison(stmt)
            except Poisoned:
                self.poison(stmt)
        if not self.errors:
            self.finish()
        if self.errors:
            raise GraphcError(self.errors)
        return ModelIR(self.model.name, self.outputs, self.loss, self.params, self.inputs,
                       self.model.loc, self.stats)

    def poison(self, stmt) -> None:
        if isinstance(stmt, (ast.Binding, ast.InputDecl, ast.ParamDecl)):
            self.env[stmt.name] = POISON
        elif isinstance(stmt, ast.OutputDecl):
            for item in stmt.items:
                if item.name:
                    self.env[item.name] = POISON

    def error(self, message: str, loc: SourceLoc | None, hint: str | None = None) -> GraphcError:
        return self.src.error(message, loc, hint)

    def finish(self) -> None:
        if not self.outputs:
            self.errors.append(self.src.diagnostic(
                f"model '{self.model.name}' declares no output", self.model.name_loc,
                "add `output NAME` for the values forward() should return"))
            return
        infer_roles(self)
        for var, role, members in self.param_sets:
            final = tuple(n for n, p in self.params.items() if p.role == role)
            missing = [n for n in final if n not in members]
            if missing:
                self.errors.append(self.src.diagnostic(
                    f"'{var.name}' here does not include {', '.join(missing)}, which "
                    f"{'is' if len(missing) == 1 else 'are'} created or first used further down",
                    var.loc, "move this line below the layers it should cover, or list the "
                    "parameters by name"))

    # --- statements -------------------------------------------------------------------------------

    def statement(self, stmt) -> None:
        if isinstance(stmt, ast.InputDecl):
            self.check_new_name(stmt.name, stmt.loc)
            ttype = self.tensor_type(stmt.type, allow_symbols=True)
            node = op_table.source("input", ttype, loc=stmt.loc, name=stmt.name)
            self.inputs[stmt.name] = node
            self.env[stmt.name] = Tensor(node, stmt.name)
        elif isinstance(stmt, ast.ParamDecl):
            self.param_decl(stmt)
        elif isinstance(stmt, ast.Binding):
            value = self.in_scope(stmt.name, stmt.expr)
            if stmt.name == "loss":
                self.set_loss(value, stmt)
            self.bind(stmt.name, value)
        else:
            for item in stmt.items:
                self.output(item)

    def check_new_name(self, name: str, loc: SourceLoc) -> None:
        if name in self.declared:
            first = self.declared[name]
            raise self.error(f"'{name}' is already declared at line {first.line}", loc,
                             "inputs and parameters are declared once; give this one another name")
        self.declared[name] = loc

    def param_decl(self, stmt: ast.ParamDecl) -> None:
        self.check_new_name(stmt.name, stmt.loc)
        ttype = self.tensor_type(stmt.type, allow_symbols=False)
        if not ttype.dtype.is_float:
            raise self.error(f"param {stmt.name}: parameters must be floating point, not "
                             f"{ttype.dtype}", stmt.type.dtype_loc)
        if stmt.init is None:
            raise self.error(f"param {stmt.name} needs an initializer", stmt.loc,
                             f"for example: param {stmt.name}: {ttype} = "
                             f"{'zeros()' if ttype.ndim == 1 else 'kaiming()'}")
        init = self.initializer(stmt.init)
        if init[0] == "orthogonal" and ttype.ndim < 2:
            raise self.error(f"param {stmt.name}: orthogonal() needs a matrix (two or more axes), "
                             f"not {ttype}", stmt.init.loc, "use zeros() or normal() for a vector")
        role = None
        if stmt.role is not None:
            role, role_loc = stmt.role
            if role not in ROLES:
                raise self.error(f"unknown parameter role '{role}'", role_loc,
                                 did_you_mean(role, ROLES) or "roles are weight, bias and other")
        tensor = self.new_param(stmt.name, ttype, init, role, stmt.loc)
        self.params[stmt.name].explicit_role = role is not None
        self.env[stmt.name] = tensor

    def initializer(self, expr: ast.Expr) -> tuple:
        if not isinstance(expr, ast.Call):
            raise self.error("a parameter's initializer must be a call such as kaiming() or "
                             "zeros()", expr.loc)
        spec = INITIALIZERS.get(expr.func)
        if spec is None:
            raise self.error(f"unknown initializer '{expr.func}'", expr.func_loc,
                             did_you_mean(expr.func, INITIALIZERS) or
                             f"initializers: {', '.join(INITIALIZERS)}")
        names = list(spec.options)
        if len(expr.args) > len(names):
            takes = (f"takes at most {len(names)} argument{'s' if len(names) != 1 else ''}"
                     if names else "takes no arguments")
            raise self.error(f"{expr.func}() {takes}, got {len(expr.args)}", expr.loc)
        options = dict(spec.options)
        given = list(zip(names, expr.args)) + [(k.name, k.value) for k in expr.kwargs]
        for key, value_expr in given:
            if key not in spec.options:
                raise self.error(f"{expr.func}() has no option '{key}'", value_expr.loc,
                                 did_you_mean(key, names) or
                                 (f"{expr.func}() takes {', '.join(names)}" if names
                                  else f"{expr.func}() takes no options"))
            if key in spec.strings:
                options[key] = self.string_option(expr.func, key, value_expr)
                continue
            if key in spec.choices:
                word = (value_expr.value if isinstance(value_expr, ast.String) else
                        value_expr.name if isinstance(value_expr, ast.Var) else None)
                if word not in spec.choices[key]:
                    raise self.error(f"{expr.func}(): {key} is one of "
                                     f"{', '.join(spec.choices[key])}", value_expr.loc,
                                     did_you_mean(str(word), spec.choices[key]))
                options[key] = word
                continue
            kind = "int" if key.startswith("fan_") else "float"
            # An option is a number; a layer written there (an error, reported below) still
            # needs a scope to name its parameters in.
            self.frames.append(Scope((f"{expr.func}.{key}",), False))
            try:
                value = convert_attr(f"{expr.func}()", key, Attr(kind), self.eval(value_expr),
                                     value_expr.loc)
            except ArgError as err:
                raise self.error(err.message, err.loc, err.hint) from None
            finally:
                self.frames.pop()
            if not math.isfinite(value):
                raise self.error(f"{expr.func}(): {key} must be finite, got {value}",
                                 value_expr.loc)
            if key in ("std", "fan_in", "fan_out") and value <= 0:
                raise self.error(f"{expr.func}(): {key} must be positive, got {value}",
                                 value_expr.loc)
            options[key] = value
        for key in spec.required:
            if options[key] is None:
                raise self.error(f"{expr.func}() needs {key}", expr.loc)
        if expr.func == "uniform" and options["low"] >= options["high"]:
            raise self.error(f"uniform(): low must be below high, got {options['low']} and "
                             f"{options['high']}", expr.loc)
        return expr.func, tuple(options.items())

    def string_option(self, fn: str, key: str, expr: ast.Expr) -> str:
        """An initializer's string option (npz's file and key), checked where it is written."""
        if not isinstance(expr, ast.String):
            raise self.error(f"{fn}(): {key} must be a string in double quotes", expr.loc)
        if key == "file" and npz_path_problem(expr.value):
            raise self.error(f"{fn}(): {npz_path_problem(expr.value)}", expr.loc)
        if not expr.value:
            raise self.error(f"{fn}(): {key} must not be empty", expr.loc)
        return expr.value

    def tensor_type(self, t: ast.TypeExpr, allow_symbols: bool) -> TensorType:
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise self.error(f"unknown dtype '{t.dtype}'", t.dtype_loc,
                             unknown_dtype(t.dtype) or "dtypes: f32, f64, i32, i64")
        if dtype is DType.bf16:
            raise self.error("bf16 is reserved: no backend runs it yet", t.dtype_loc,
                             "use f32 (or f16)")
        shape = []
        for dim, loc in t.dims:
            if isinstance(dim, str):
                if not allow_symbols:
                    raise self.error(f"parameter shapes must be concrete: '{dim}' is a symbolic "
                                     f"dimension", loc, "only inputs may have symbolic sizes")
                self.dims.add(dim)
            elif dim == 0:
                raise self.error("a dimension must be at least 1", loc)
            shape.append(dim)
        ttype = TensorType(dtype, tuple(shape))
        problem = shape_problem(ttype.shape)
        if problem:
            raise self.error(f"the type {ttype} is too large: {problem}", t.loc)
        return ttype

    def set_loss(self, value, stmt: ast.Binding) -> None:
        if not isinstance(value, Tensor):
            raise self.error(f"the loss must be a tensor expression, got {describe(value)}",
                             stmt.expr.loc)
        ttype = value.node.type
        if ttype.shape != () or not ttype.dtype.is_float:
            raise self.error(f"the loss must be a floating-point scalar: it is {ttype}",
                             stmt.expr.loc, "reduce it with mean(...) or sum(...)"
                             if ttype.shape else None)
        self.loss = value.node if value.node.name else value.node.relabeled(name="loss")

    def output(self, item: ast.OutputItem) -> None:
        if item.name is None and isinstance(item.expr, ast.Var):
            name = item.expr.name
        else:
            name = item.name or f"output{len(self.outputs)}"
        if name in self.outputs:
            raise self.error(f"output '{name}' is declared twice", item.loc)
        value = self.in_scope(name, item.expr)
        if not isinstance(value, Tensor):
            raise self.error(f"an output must be a tensor, got {describe(value)}", item.expr.loc)
        if item.name is not None:
            self.bind(item.name, value)
            value = self.env[item.name]
        self.outputs[name] = value.node   # the graph names its outputs; the node keeps its name

    def bind(self, name: str, value) -> None:
        if isinstance(value, Tensor) and value.node.name is None:
            value = Tensor(value.node.relabeled(name=name), name)
        elif isinstance(value, Tensor):
            value = Tensor(value.node, name)
        self.env[name] = value

    # --- naming of layer parameters -----------------------------------------------------------------

    def in_scope(self, name: str, expr: ast.Expr):
        uses = self.scope_uses.get(name, 0) + 1
        self.scope_uses[name] = uses
        path = (name if uses == 1 else f"{name}_{uses}",)
        self.frames.append(Scope(path, self.count_param_sites(expr, self.is_tensor_name) == 1))
        try:
            return self.eval(expr)
        finally:
            self.frames.pop()

    def is_tensor_name(self, name: str) -> bool:
        return isinstance(self.env.get(name), Tensor)

    def count_param_sites(self, expr: ast.Expr, is_tensor) -> int:
        return count_param_sites(expr, self.param_functions, is_tensor)

    def layer_prefix(self, kind: str) -> str:
        frame = self.frames[-1]
        if frame.collapse and not frame.used_collapse:
            frame.used_collapse = True
            return ".".join(frame.path)
        k = frame.counts.get(kind, 0) + 1
        frame.counts[kind] = k
        return ".".join(frame.path + (kind if k == 1 else f"{kind}_{k}",))

    def set_layer_role(self, name: str, role: str, loc: SourceLoc) -> None:
        """The role a layer gives a declared parameter passed to it (batchnorm's running
        statistics are role stat: train steps set them, no optimizer touches them)."""
        spec = self.params[name]
        if spec.role is not None and spec.role != role:
            raise self.error(f"{name} is the {role} parameter of a layer here, but it is "
                             f"{'declared' if spec.explicit_role else 'already'} {spec.role}", loc)
        spec.role = role

    def new_param(self, name: str, ttype: TensorType, init: tuple, role: str | None,
                  loc: SourceLoc) -> Tensor:
        assert name not in self.params, f"internal error: parameter {name} created twice"
        problem = shape_problem(ttype.shape)
        if problem:
            raise self.error(f"parameter {name} ({ttype}) is too large: {problem}", loc)
        self.param_bytes += ttype.size() * ttype.dtype.numpy.itemsize
        if self.param_bytes > MAX_PARAM_BYTES:
            raise self.error(f"parameter {name} ({ttype}) brings the model's parameters to "
                             f"{self.param_bytes / 2**30:,.1f} GiB, over the limit of "
                             f"{MAX_PARAM_BYTES // 2**30} GiB", loc,
                             "graphc holds every parameter in memory four times while training")
        node = op_table.source("param", ttype, loc=loc, name=name)
        self.params[name] = ParamSpec(name, ttype, init, role, loc, node)
        return Tensor(node, name)

    # --- expressions ----------------------------------------------------------------------------------

    def label(self, expr: ast.Expr) -> str:
        if isinstance(expr, ast.Var):
            return expr.name
        return self.src.snippet(label_span(expr)) or "<expression>"

    def eval(self, expr: ast.Expr):
        # The depth is counted here, not in a wrapper: each level of nesting costs Python frames.
        if self.depth >= MAX_NESTING:
            raise self.error(f"expression nested too deeply: more than {MAX_NESTING} levels, "
                             f"counting the bodies of the functions it calls", expr.loc,
                             "name intermediate results (`h = ...`) to flatten it")
        self.evaluations += 1
        if self.evaluations > MAX_EVALUATIONS + 1:
            raise Poisoned()        # reported once, at the evaluation that passed the limit
        if self.evaluations > MAX_EVALUATIONS:
            raise self.error(f"model {self.model.name} is too large: it evaluates more than "
                             f"{MAX_EVALUATIONS:,} expressions, counting the bodies of user "
                             f"functions at each call", expr.loc,
                             "a function that calls another twice doubles the work with each "
                             "level: f2(x) = f1(f1(x))")
        self.depth += 1
        try:
            if isinstance(expr, ast.Number):
                return Scalar(expr.value, expr.loc)
            if isinstance(expr, (ast.String, ast.Bool)):
                return Scalar(expr.value, expr.loc)
            if isinstance(expr, ast.Var):
                return self.lookup(expr)
            if isinstance(expr, ast.ListExpr):
                return ListValue(tuple(self.eval(i) for i in expr.items), expr.loc)
            if isinstance(expr, ast.Neg):
                value = self.eval(expr.operand)
                if isinstance(value, Scalar) and isinstance(value.value, (int, float)) \
                        and not isinstance(value.value, bool):
                    return Scalar(-value.value, expr.loc)
                return self.apply_op("neg", [self.tensor_arg("-", value, expr.operand)], {}, expr)
            if isinstance(expr, ast.BinOp):
                return self.binop(expr)
            if isinstance(expr, ast.Call):
                return self.call(expr)
            raise AssertionError(f"internal error: cannot evaluate {expr!r}")
        finally:
            self.depth -= 1

    def lookup(self, var: ast.Var):
        name = var.name
        if name in self.env:
            value = self.env[name]
            if value is POISON:
                raise Poisoned()
            return value
        if name in DTYPE_NAMES:
            return DTypeValue(DTYPE_NAMES[name])
        if name in self.dims:
            return DimName(name)
        if name in ("weights", "biases"):
            role = name[:-1] if name == "weights" else "bias"
            roles = infer_roles(self, final=False)
            members = tuple(n for n, r in roles.items() if r == role)
            if not members:
                raise self.error(f"'{name}' is empty here: no {role} parameter is declared or "
                                 f"created above this line", var.loc)
            self.param_sets.append((var, role, members))
            return ParamSet(role, tuple(Tensor(self.params[n].node, n) for n in members))
        if name in self.defs or name in LAYERS or name in CALLABLE_OPS:
            raise self.error(f"'{name}' is a function; call it as {name}(...)", var.loc)
        later = self.bound_later(name, var.loc)
        if later is not None:
            raise self.error(f"'{name}' is used before it is defined", var.loc,
                             f"it is defined further down, at line {later.line}; "
                             f"bind a name before using it")
        candidates = list(self.env) + ["weights", "biases"] + list(DTYPE_NAMES)
        raise self.error(f"unknown name '{name}'", var.loc, did_you_mean(name, candidates))

    def bound_later(self, name: str, loc: SourceLoc) -> SourceLoc | None:
        for stmt in self.model.stmts:
            names = [(stmt.name, stmt.loc)] if isinstance(stmt, (ast.Binding, ast.InputDecl,
                                                                 ast.ParamDecl)) else \
                [(i.name, i.loc) for i in stmt.items if i.name]
            for bound, where in names:
                if bound == name and (where.line, where.col) > (loc.line, loc.col):
                    return where
        return None

    def tensor_arg(self, fn: str, value, expr: ast.Expr) -> Tensor:
        if isinstance(value, Tensor):
            return value
        if isinstance(value, ParamSet):
            raise self.error(f"{fn}: '{value.role}s' is a set of parameters; only l1(...) and "
                             f"l2(...) take it", expr.loc)
        raise self.error(f"{fn}: expected a tensor, got {describe(value)}", expr.loc)

    def operand(self, fn: str, value, expr: ast.Expr, like: Tensor | None) -> tuple[Node, str]:
        """A tensor operand, turning a plain number into a constant of its partner's dtype."""
        if isinstance(value, Scalar) and isinstance(value.value, (int, float)) \
                and not isinstance(value.value, bool):
            dtype = like.node.type.dtype if like else DType.f32
            if dtype.is_int and isinstance(value.value, float):
                raise self.error(f"{fn}: cannot mix the number {value.value} with the integer "
                                 f"tensor {like.label} ({like.node.type})", expr.loc,
                                 f"convert it first: cast({like.label}, f32)")
            if dtype is DType.bool:
                raise self.error(f"{fn}: cannot combine a number with the bool tensor "
                                 f"{like.label}", expr.loc)
            node = op_table.source("const", TensorType(dtype, ()), loc=expr.loc, value=value.value)
            return node, self.label(expr)
        tensor = self.tensor_arg(fn, value, expr)
        return tensor.node, tensor.label

    def binop(self, expr: ast.BinOp):
        left, right = self.eval(expr.left), self.eval(expr.right)
        numbers = all(isinstance(v, Scalar) and isinstance(v.value, (int, float)) for v in
                      (left, right))
        if numbers and expr.op in _FOLD:
            return Scalar(self.fold(expr, left.value, right.value), expr.loc)
        like = left if isinstance(left, Tensor) else right if isinstance(right, Tensor) else None
        a = self.operand(expr.op, left, expr.left, like)
        b = self.operand(expr.op, right, expr.right, like)
        return self.make(expr.op, [a, b], {}, expr)

    def fold(self, expr: ast.BinOp, a, b):
        """Arithmetic on plain numbers, done now; results are kept to what a float can hold."""
        if expr.op == "pow" and isinstance(a, int) and isinstance(b, int):
            a = float(a)     # integer powers are exact but unbounded: 10 ** 10 ** 10 never ends
        try:
            value = _FOLD[expr.op](a, b)
        except ZeroDivisionError:
            raise self.error(f"cannot compute {self.label(expr)}: division by zero",
                             expr.loc) from None
        except OverflowError:
            raise self.error(f"cannot compute {self.label(expr)}: the result is too large",
                             expr.loc) from None
        if isinstance(value, complex):
            raise self.error(f"cannot compute {self.label(expr)}: the result is not a real number",
                             expr.loc)
        if isinstance(value, float) and not math.isfinite(value) or \
                isinstance(value, int) and abs(value) > MAX_INT:
            raise self.error(f"cannot compute {self.label(expr)}: the result is too large",
                             expr.loc)
        return value

    def apply_op(self, op: str, operands: list, attrs: dict, expr: ast.Expr,
                 attr_locs: dict[str, SourceLoc] | None = None) -> Tensor:
        pairs = [(o.node, o.label) if isinstance(o, Tensor) else o for o in operands]
        return self.make(op, pairs, attrs, expr, attr_locs)

    def make(self, op: str, pairs: list[tuple[Node, str]], attrs: dict, expr: ast.Expr,
             attr_locs: dict[str, SourceLoc] | None = None) -> Tensor:
        try:
            node = op_table.apply(op, [n for n, _ in pairs], attrs, loc=expr.loc,
                                  labels=[lab for _, lab in pairs])
        except TypeError_ as err:
            loc = (attr_locs or {}).get(err.attr, expr.loc)
            raise self.error(err.message, loc, err.hint) from None
        return Tensor(node, self.label(expr))

    def call(self, expr: ast.Call):
        fn = expr.func
        known = {*self.defs, *LAYERS, *CALLABLE_OPS, "dropout"}
        if fn not in known:
            if fn in INITIALIZERS:
                raise self.error(f"{fn}() is an initializer; use it in a parameter declaration",
                                 expr.func_loc, f"param W: f32[...] = {fn}()")
            raise self.error(f"unknown function '{fn}'", expr.func_loc, did_you_mean(fn, known))
        args = [self.eval(a) for a in expr.args]
        kwargs = {k.name: self.eval(k.value) for k in expr.kwargs}
        seen = set()
        for k in expr.kwargs:
            if k.name in seen:
                raise self.error(f"{fn}: {k.name} is given twice", k.loc)
            seen.add(k.name)
        try:
            if fn in self.defs:
                return self.call_def(expr, args, kwargs)
            if fn == "dropout":
                return self.dropout(expr, args, kwargs)
            if fn in LAYERS and _is_layer_form(fn, args):
                return LAYERS[fn].build(self, expr, args, kwargs)
            if fn == "attention":
                return self.attention(expr, args, kwargs)
            if fn in CALLABLE_OPS:
                return self.call_op(expr, args, kwargs)
        except ArgError as err:
            raise self.error(err.message, err.loc or expr.loc, err.hint) from None
        raise AssertionError(f"internal error: {fn} is known but was not dispatched")

    def call_op(self, expr: ast.Call, args: list, kwargs: dict) -> Tensor:
        op = CALLABLE_OPS[expr.func]
        operands, attrs = bind_op_args(op, expr.func, args, kwargs, expr)
        attr_locs = {k.name: k.loc for k in expr.kwargs}
        positional_attrs = list(op.attrs)[:max(len(expr.args) - len(operands), 0)]
        for key, arg in zip(positional_attrs, expr.args[len(operands):]):
            attr_locs[key] = arg.loc
        # A plain number takes the dtype of the values beside it (not of a where's condition).
        tensors = [o for o in operands if isinstance(o, Tensor)]
        like = next((t for t in tensors if t.node.dtype is not DType.bool), None) or \
            next(iter(tensors), None)
        arg_exprs = list(expr.args)
        pairs = []
        for i, value in enumerate(operands):
            sub = arg_exprs[i] if i < len(arg_exprs) else expr
            if isinstance(value, Tensor) and i >= len(arg_exprs):
                pairs.append((value.node, value.label))
            else:
                pairs.append(self.operand(expr.func, value, sub, like))
        return self.make(expr.func, pairs, attrs, expr, attr_locs)

    def dropout(self, expr: ast.Call, args: list, kwargs: dict):
        if not args:
            raise ArgError("dropout needs a tensor argument", expr.loc)
        x = self.tensor_arg("dropout", args[0], expr.args[0])
        p_value = args[1] if len(args) > 1 else kwargs.get("p")
        p_loc = expr.args[1].loc if len(args) > 1 else expr.kwarg_loc("p") or expr.loc
        extra = sorted(set(kwargs) - {"p"})
        if extra:
            raise ArgError(f"dropout has no option '{extra[0]}'", expr.kwarg_loc(extra[0]),
                           "dropout takes p, the probability of dropping a unit")
        if len(args) > 2:
            raise ArgError(f"dropout takes a tensor and p, got {len(args)} arguments", expr.loc)
        p = 0.5 if p_value is None else convert_attr("dropout", "p", Attr("float"), p_value, p_loc)
        if not 0.0 <= p < 1.0:
            raise ArgError(f"dropout: p must be in [0, 1), got {p}", p_loc,
                           "p is the probability of dropping a unit")
        if p == 0.0:
            return x
        self.random_streams += 1
        return self.make("dropout", [(x.node, x.label)], {"p": p, "stream": self.random_streams - 1},
                         expr)

    def attention(self, expr: ast.Call, args: list, kwargs: dict):
        """The attention op; with dropout, its weights draw their own stream, as a dropout site."""
        for hidden in ("stream", "train"):
            if hidden in kwargs:
                raise ArgError(f"attention has no option '{hidden}'", expr.kwarg_loc(hidden),
                               "attention takes causal and dropout")
        if len(args) > 3:
            raise ArgError(f"attention takes q, k and v (then causal=, dropout=), got {len(args)} "
                           f"arguments", expr.loc)
        out = self.call_op(expr, args, kwargs)
        if out.node.attr["dropout"] == 0.0:
            return out
        self.random_streams += 1
        node = op_table.apply("attention", out.node.inputs,
                              {**out.node.attr, "stream": self.random_streams - 1}, loc=expr.loc)
        return Tensor(node, out.label)

    def call_def(self, expr: ast.Call, args: list, kwargs: dict):
        d = self.defs[expr.func]
        if expr.func in self.def_stack:
            cycle = self.def_stack[self.def_stack.index(expr.func) + 1:]
            through = f" through {' and '.join(cycle)}" if cycle else ""
            raise self.error(f"{expr.func} calls itself{through}; functions cannot be recursive",
                             expr.loc)
        if kwargs:
            raise self.error(f"{expr.func}: arguments of user functions are positional", expr.loc)
        if len(args) != len(d.params):
            raise self.error(f"{expr.func} takes {len(d.params)} argument"
                             f"{'s' if len(d.params) != 1 else ''} ({', '.join(d.params)}), got "
                             f"{len(args)}", expr.loc,
                             "in a pipeline the value on the left is the first argument"
                             if expr.piped else None)
        local = dict(zip(d.params, args))
        outer_env = self.env
        frame = self.frames[-1]
        if d.name in self.param_functions:
            prefix = self.layer_prefix(d.name)
            path = tuple(prefix.split("."))
        else:
            path = frame.path
        sites = self.count_param_sites(d.body, lambda n: isinstance(local.get(n), Tensor))
        self.frames.append(Scope(path, sites == 1))
        self.env, self.def_stack = local, self.def_stack + [d.name]
        try:
            return self.eval(d.body)
        except GraphcError as err:
            note = self.src.diagnostic(f"in {d.name}(...) called here", expr.loc, severity="note")
            notes = sum(1 for diag in err.diagnostics if diag.severity == "note")
            # A long chain of calls: the innermost few and the outermost (the one in the model).
            kept = err.diagnostics[:-1] if notes >= _MAX_CALL_NOTES else err.diagnostics
            raise GraphcError(kept + [note]) from None
        finally:
            self.env, self.def_stack = outer_env, self.def_stack[:-1]
            self.frames.pop()


_MAX_CALL_NOTES = 8


def _is_layer_form(fn: str, args: list) -> bool:
    """`linear(x, 10)` and `embedding(x, 1000, 16)` (sizes) make parameters; `linear(x, W)` and
    `embedding(x, E)` (tensors) are the ops of the same names."""
    if fn == "linear":
        return len(args) == 2 and isinstance(args[1], Scalar)
    if fn == "embedding":
        return len(args) != 2 or isinstance(args[1], Scalar)
    return True
