"""Calling things from .nn code: binding arguments to an op's operands and attributes (read from
the op table), layers that create their own parameters, and the functions the builder special-cases."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graphc.errors import did_you_mean
from graphc.frontend import ast
from graphc.frontend.values import DTypeValue, ListValue, ParamSet, Scalar, Tensor, describe
from graphc.ir import ops as op_table
from graphc.ir.ops import Attr, OpDef
from graphc.ir.types import DType, TensorType

if TYPE_CHECKING:
    from graphc.frontend.protocols import LayerBuilder

# Ops a user may call by name: everything but the source ops.
# Random draws are keyed by the training step, which .nn files do not see: dropout uses them.
CALLABLE_OPS = {name: op for name, op in op_table.OPS.items() if op.kind not in ("source", "random")}


class ArgError(Exception):
    def __init__(self, message: str, loc=None, hint: str | None = None):
        super().__init__(message)
        self.message, self.loc, self.hint = message, loc, hint


def convert_attr(fn: str, key: str, spec: Attr, value, loc):
    """A .nn value as an attribute of the kind the op table declares."""
    def fail(what: str):
        return ArgError(f"{fn}: {key} must be {what}, got {describe(value)}", loc)

    raw = value.value if isinstance(value, Scalar) else None
    if spec.kind in ("int", "axis"):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise fail("an integer")
        return raw
    if spec.kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise fail("a number")
        return float(raw)
    if spec.kind == "bool":
        if not isinstance(raw, bool):
            raise fail("true or false")
        return raw
    if spec.kind == "str":
        if not isinstance(raw, str):
            raise fail("a string")
        return raw
    if spec.kind == "dtype":
        if isinstance(value, DTypeValue):
            return value.dtype.value
        raise fail("a dtype such as f32")
    if spec.kind == "axes":
        if isinstance(value, ListValue):
            return tuple(convert_attr(fn, key, Attr("int"), v, loc) for v in value.items)
        return convert_attr(fn, key, Attr("int"), value, loc)
    if spec.kind == "ints":
        if not isinstance(value, ListValue):
            raise fail("a list of sizes such as [N, 784]")
        out = []
        for v in value.items:
            if isinstance(v, DimName):
                out.append(v.name)
            else:
                out.append(convert_attr(fn, key, Attr("int"), v, loc))
        return tuple(out)
    raise AssertionError(f"internal error: attribute kind {spec.kind}")


@dataclass(frozen=True)
class DimName:
    """A symbolic dimension named in an expression (only shapes may use one)."""
    name: str


def bind_op_args(op: OpDef, fn: str, args: list, kwargs: dict, call: ast.Call):
    """Split a call's values into operands and attributes by the op's declaration."""
    lo, hi = (op.arity, op.arity) if isinstance(op.arity, int) else op.arity
    operands: list = []
    rest = list(args)
    if hi is None:
        for v in rest:
            operands.extend(v.params if isinstance(v, ParamSet) else [v])
        rest = []
    else:
        while rest and len(operands) < hi and (len(operands) < lo or isinstance(rest[0], Tensor)):
            operands.append(rest.pop(0))
    if len(operands) < lo:
        problem = op.check_arity(len(operands))
        raise ArgError(problem.replace(" operands", " tensor arguments")
                       .replace(" operand,", " tensor argument,"), call.loc)
    attr_names = list(op.attrs)
    if len(rest) > len(attr_names):
        extra = len(operands) + len(attr_names)
        raise ArgError(f"{fn} takes at most {extra} positional argument{'s' if extra != 1 else ''}"
                       f", got {len(args)}", call.loc)
    attrs = {}
    arg_locs = [a.loc for a in call.args]
    for key, value, idx in zip(attr_names, rest, range(len(operands), len(args))):
        attrs[key] = convert_attr(fn, key, op.attrs[key], value, arg_locs[idx])
    for kw in call.kwargs:
        if kw.name not in op.attrs:
            known = list(op.attrs)
            hint = did_you_mean(kw.name, known) or (
                f"{fn} takes {', '.join(known)}" if known else f"{fn} takes no options")
            raise ArgError(f"{fn} has no option '{kw.name}'", kw.loc, hint)
        if kw.name in attrs:
            raise ArgError(f"{fn}: {kw.name} is given twice", kw.loc)
        attrs[kw.name] = convert_attr(fn, kw.name, op.attrs[kw.name], kwargs[kw.name], kw.value.loc)
    for key, spec in op.attrs.items():
        if spec.required and key not in attrs:
            raise ArgError(f"{fn} needs {key}", call.loc)
    return operands, attrs


# --- layers: functions that own parameters ---------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    name: str
    build: Callable[[LayerBuilder, ast.Call, list, dict], Tensor]
    signature: str


def _options(fn: str, call: ast.Call, kwargs: dict, specs: dict[str, Attr]) -> dict:
    """A layer's keyword options, converted as the op table would; unknown ones named."""
    for name in kwargs:
        if name not in specs:
            raise ArgError(f"{fn} has no option '{name}'", call.kwarg_loc(name),
                           did_you_mean(name, list(specs)) or f"{fn} takes {', '.join(specs)}")
    return {name: convert_attr(fn, name, specs[name], value, call.kwarg_loc(name, value=True))
            for name, value in kwargs.items()}


def _linear_layer(b: LayerBuilder, call: ast.Call, args: list, kwargs: dict) -> Tensor:
    if len(args) != 2 or not isinstance(args[1], Scalar):
        raise AssertionError("internal error: dispatch sends only linear(x, n) here")
    x = b.tensor_arg("linear", args[0], call.args[0])
    n = convert_attr("linear", "n", Attr("int"), args[1], call.args[1].loc)
    if n < 1:
        raise ArgError(f"linear: the number of outputs must be at least 1, got {n}", call.args[1].loc)
    unknown = set(kwargs) - {"bias", "std"}
    if unknown:
        name = sorted(unknown)[0]
        raise ArgError(f"linear has no option '{name}'", call.kwarg_loc(name),
                       did_you_mean(name, ["bias", "std"]) or "linear takes n, bias and std")
    bias = True
    if "bias" in kwargs:
        bias = convert_attr("linear", "bias", Attr("bool"), kwargs["bias"],
                            call.kwarg_loc("bias", value=True))
    init = ("kaiming", (("fan_in", None),))
    if "std" in kwargs:     # N(0, std) instead of Kaiming's (GPT-2 draws its layers with std 0.02)
        std = convert_attr("linear", "std", Attr("float"), kwargs["std"], call.kwarg_loc("std", value=True))
        if not std > 0:
            raise ArgError(f"linear: std must be positive, got {std}", call.kwarg_loc("std", value=True))
        init = ("normal", (("mean", 0.0), ("std", float(std))))
    if not x.node.type.dtype.is_float or not x.node.type.shape:
        raise ArgError(f"linear: needs floating-point features: {x.label} is {x.node.type}", call.loc)
    fan_in = x.node.type.shape[-1]
    if isinstance(fan_in, str):
        raise ArgError(f"linear: the feature axis of {x.label} is symbolic ({fan_in}); "
                       f"its size must be known", call.loc)
    dtype = x.node.type.dtype
    prefix = b.layer_prefix("linear")
    w = b.new_param(f"{prefix}.W", TensorType(dtype, (fan_in, n)), init, "weight", call.loc)
    operands = [x, w]
    if bias:
        operands.append(b.new_param(f"{prefix}.b", TensorType(dtype, (n,)), ("zeros", ()), "bias",
                                    call.loc))
    return b.apply_op("linear", operands, {}, call)


def _layernorm_layer(b: LayerBuilder, call: ast.Call, args: list, kwargs: dict) -> Tensor:
    """PyTorch's LayerNorm over the last axis: a learned scale (ones) and shift (zeros), roles
    other and bias, so `l2(weights)` never reaches them. `bias=false` leaves the shift out
    (PyTorch's `bias=False`, nanoGPT's layer norms)."""
    if len(args) != 1:
        raise ArgError(f"layernorm takes the input only (and eps=, bias=), got {len(args)} arguments",
                       call.loc)
    x = b.tensor_arg("layernorm", args[0], call.args[0])
    attrs = _options("layernorm", call, kwargs, {"eps": Attr("float"), "bias": Attr("bool")})
    bias = attrs.pop("bias", True)
    shape = x.node.type.shape
    if not x.node.type.dtype.is_float or not shape or isinstance(shape[-1], str):
        raise ArgError(f"layernorm: needs floating-point features with a known last axis: "
                       f"{x.label} is {x.node.type}", call.loc)
    dtype, n = x.node.type.dtype, shape[-1]
    prefix = b.layer_prefix("layernorm")
    gamma = b.new_param(f"{prefix}.gamma", TensorType(dtype, (n,)), ("ones", ()), "other", call.loc)
    operands = [x, gamma]
    if bias:
        operands.append(b.new_param(f"{prefix}.beta", TensorType(dtype, (n,)), ("zeros", ()), "bias",
                                    call.loc))
    return b.apply_op("layer_norm", operands, attrs, call)


def _batchnorm_layer(b: LayerBuilder, call: ast.Call, args: list, kwargs: dict) -> Tensor:
    """PyTorch's BatchNorm1d ([N, C]) and BatchNorm2d ([N, C, H, W]): a learned scale (ones, role
    other) and shift (zeros, role bias), and running estimates of each channel's mean and
    variance (role stat) that training steps update and evaluation uses."""
    if len(args) not in (1, 5):
        raise ArgError(f"batchnorm takes the input only (and eps=, momentum=), or the input and "
                       f"four declared parameters gamma, beta, running_mean, running_var; got "
                       f"{len(args)} arguments", call.loc)
    x = b.tensor_arg("batchnorm", args[0], call.args[0])
    options = _options("batchnorm", call, kwargs, {"eps": Attr("float"), "momentum": Attr("float")})
    shape = x.node.type.shape
    if x.node.type.ndim not in (2, 4) or any(isinstance(d, str) for d in shape[1:]) \
            or not x.node.type.dtype.is_float:
        raise ArgError(f"batchnorm: needs floating-point features [N, C] or images [N, C, H, W] "
                       f"with known sizes past the batch axis: {x.label} is {x.node.type}", call.loc)
    if "eps" in options and options["eps"] <= 0:
        raise ArgError(f"batchnorm: eps must be positive, got {options['eps']}",
                       call.kwarg_loc("eps", value=True))
    dtype, c = x.node.type.dtype, shape[1]
    vec = TensorType(dtype, (c,))
    if len(args) == 5:      # declared parameters (an imported model's): the stats become role stat
        gamma, beta, mean, var = (_declared_param(b, "batchnorm", what, value, expr, vec)
                                  for what, value, expr in zip(_BN_PARAMS, args[1:], call.args[1:]))
        for param, role, expr in zip((gamma, beta, mean, var), ("other", "bias", "stat", "stat"),
                                     call.args[1:]):
            b.set_layer_role(param.node.attr["name"], role, expr.loc)
    else:
        prefix = b.layer_prefix("batchnorm")
        gamma = b.new_param(f"{prefix}.gamma", vec, ("ones", ()), "other", call.loc)
        beta = b.new_param(f"{prefix}.beta", vec, ("zeros", ()), "bias", call.loc)
        mean = b.new_param(f"{prefix}.running_mean", vec, ("zeros", ()), "stat", call.loc)
        var = b.new_param(f"{prefix}.running_var", vec, ("ones", ()), "stat", call.loc)
    locs = _option_locs(call, {})
    momentum = {k: options[k] for k in ("momentum",) if k in options}
    for stat, running in (("mean", mean), ("var", var)):
        b.stats[running.label] = b.apply_op("running_stat", [x, running], {"stat": stat, **momentum},
                                            call, locs).node
    return b.apply_op("batch_norm", [x, gamma, beta, mean, var],
                      {k: options[k] for k in ("eps",) if k in options}, call, locs)


_BN_PARAMS = ("gamma", "beta", "running_mean", "running_var")


def _declared_param(b: LayerBuilder, fn: str, what: str, value, expr: ast.Expr,
                    ttype: TensorType) -> Tensor:
    t = b.tensor_arg(fn, value, expr)
    if t.node.op != "param" or t.node.type != ttype:
        raise ArgError(f"{fn}: {what} must be a declared parameter of type {ttype}: {t.label} is "
                       f"{t.node.type}", expr.loc)
    return t


def _embedding_layer(b: LayerBuilder, call: ast.Call, args: list, kwargs: dict) -> Tensor:
    """PyTorch's Embedding: a table E: [vocab, dim] drawn from N(0, 1), rows picked by x."""
    if len(args) != 3 or kwargs:
        raise ArgError("embedding takes the indices, the vocabulary size and the dimension: "
                       "x -> embedding(vocab, dim)", call.loc)
    x = b.tensor_arg("embedding", args[0], call.args[0])
    if not x.node.type.dtype.is_int:
        raise ArgError(f"embedding: the indices must be integers: {x.label} is {x.node.type}",
                       call.args[0].loc)
    sizes = []
    for what, value, expr in (("vocab", args[1], call.args[1]), ("dim", args[2], call.args[2])):
        n = convert_attr("embedding", what, Attr("int"), value, expr.loc)
        if n < 1:
            raise ArgError(f"embedding: {what} must be at least 1, got {n}", expr.loc)
        sizes.append(n)
    prefix = b.layer_prefix("embedding")
    table = b.new_param(f"{prefix}.E", TensorType(DType.f32, tuple(sizes)),
                        ("normal", (("mean", 0.0), ("std", 1.0))), "weight", call.loc)
    return b.apply_op("embedding", [x, table], {}, call)


def _conv_layer(b: LayerBuilder, call: ast.Call, args: list, kwargs: dict) -> Tensor:
    """PyTorch's Conv2d: weights [out, in, k, k] drawn by Kaiming (fan_in = in * k * k), zero bias."""
    if len(args) != 3 or not isinstance(args[1], Scalar) or not isinstance(args[2], Scalar | ListValue):
        raise ArgError("conv takes the images, the number of output channels and the kernel size: "
                       "x -> conv(32, 3)", call.loc)
    x = b.tensor_arg("conv", args[0], call.args[0])
    out = convert_attr("conv", "out_channels", Attr("int"), args[1], call.args[1].loc)
    if out < 1:
        raise ArgError(f"conv: out_channels must be at least 1, got {out}", call.args[1].loc)
    kernel = convert_attr("conv", "kernel", Attr("axes"), args[2], call.args[2].loc)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else (tuple(kernel) + (0, 0))[:2]
    if (isinstance(kernel, tuple) and len(kernel) != 2) or kh < 1 or kw < 1:
        raise ArgError(f"conv: kernel must be a positive size or a pair [kh, kw], got "
                       f"{kernel if isinstance(kernel, int) else list(kernel)}", call.args[2].loc)
    options = _options("conv", call, kwargs, {"stride": Attr("axes"), "padding": Attr("axes"),
                                              "dilation": Attr("axes"), "bias": Attr("bool")})
    bias = options.pop("bias", True)
    shape = x.node.type.shape
    if x.node.type.ndim != 4 or any(isinstance(d, str) for d in shape[1:]) \
            or not x.node.type.dtype.is_float:
        raise ArgError(f"conv: needs floating-point images [N, C, H, W] with known C, H and W: "
                       f"{x.label} is {x.node.type}", call.loc)
    dtype = x.node.type.dtype
    prefix = b.layer_prefix("conv")
    w = b.new_param(f"{prefix}.W", TensorType(dtype, (out, shape[1], kh, kw)),
                    ("kaiming", (("fan_in", None),)), "weight", call.loc)
    operands = [x, w]
    if bias:
        operands.append(b.new_param(f"{prefix}.b", TensorType(dtype, (out,)), ("zeros", ()), "bias",
                                    call.loc))
    return b.apply_op("conv2d", operands, options, call, _option_locs(call, {"kernel": 2}))


def _pool_layer(op: str):
    def build(b: LayerBuilder, call: ast.Call, args: list, kwargs: dict) -> Tensor:
        fn = call.func
        if len(args) != 2 or not isinstance(args[1], Scalar | ListValue):
            raise ArgError(f"{fn} takes the images and the kernel size: x -> {fn}(2)", call.loc)
        x = b.tensor_arg(fn, args[0], call.args[0])
        attrs = {"kernel": convert_attr(fn, "kernel", Attr("axes"), args[1], call.args[1].loc)}
        attrs |= _options(fn, call, kwargs, {"stride": Attr("axes"), "padding": Attr("axes")})
        return b.apply_op(op, [x], attrs, call, _option_locs(call, {"kernel": 1}))
    return build


# --- sequence models ----------------------------------------------------------------------------
# GPT-2's initialization for the tables and projections: N(0, 0.02), biases zero.
_GPT_INIT = ("normal", (("mean", 0.0), ("std", 0.02)))


def _size_arg(fn: str, what: str, value, expr: ast.Expr) -> int:
    n = convert_attr(fn, what, Attr("int"), value, expr.loc)
    if n < 1:
        raise ArgError(f"{fn}: {what} must be at least 1, got {n}", expr.loc)
    return n


def _positional_embedding_layer(b: LayerBuilder, call: ast.Call, args: list, kwargs: dict) -> Tensor:
    """A learned table P: [T, dim] (N(0, 0.02), role weight), added to token embeddings [N, T, dim]
    by broadcasting: `h = x -> embedding(V, d) + positional_embedding(T, d)`."""
    if len(args) != 2 or kwargs:
        raise ArgError("positional_embedding takes the context length and the dimension: "
                       "positional_embedding(T, dim)", call.loc)
    t = _size_arg("positional_embedding", "T", args[0], call.args[0])
    dim = _size_arg("positional_embedding", "dim", args[1], call.args[1])
    prefix = b.layer_prefix("positional_embedding")
    return b.new_param(f"{prefix}.P", TensorType(DType.f32, (t, dim)), _GPT_INIT, "weight", call.loc)


def _multihead_attention_layer(b: LayerBuilder, call: ast.Call, args: list, kwargs: dict) -> Tensor:
    """Multi-head self-attention over x: [..., T, C]: projections Wq, Wk, Wv: [C, d_model] and
    Wo: [d_model, d_model] (N(0, 0.02)) with biases, heads split by reshape and transpose, the
    `attention` op per head, heads merged back and projected."""
    if len(args) != 3:
        raise ArgError("multihead_attention takes the input, the model width and the number of "
                       "heads: x -> multihead_attention(d_model, heads)", call.loc)
    fn = "multihead_attention"
    x = b.tensor_arg(fn, args[0], call.args[0])
    d_model = _size_arg(fn, "d_model", args[1], call.args[1])
    heads = _size_arg(fn, "heads", args[2], call.args[2])
    options = _options(fn, call, kwargs, {"causal": Attr("bool"), "bias": Attr("bool"),
                                          "dropout": Attr("float"), "out_std": Attr("float")})
    if d_model % heads:
        raise ArgError(f"{fn}: d_model {d_model} is not a multiple of heads {heads}", call.args[2].loc)
    shape = x.node.type.shape
    if x.node.type.ndim < 2 or isinstance(shape[-1], str) or not x.node.type.dtype.is_float:
        raise ArgError(f"{fn}: needs floating-point sequences [..., T, C] with a known C: "
                       f"{x.label} is {x.node.type}", call.loc)
    p = options.get("dropout", 0.0)
    if not 0.0 <= p < 1.0:
        raise ArgError(f"{fn}: dropout must be in [0, 1), got {p}", call.kwarg_loc("dropout", value=True))
    out_std = options.get("out_std", 0.02)
    if not out_std > 0:
        raise ArgError(f"{fn}: out_std must be positive, got {out_std}",
                       call.kwarg_loc("out_std", value=True))
    dtype, c = x.node.type.dtype, shape[-1]
    prefix = b.layer_prefix(fn)
    bias = options.get("bias", True)

    def project(x: Tensor, name: str, n_in: int) -> Tensor:
        init = _GPT_INIT if name != "o" else ("normal", (("mean", 0.0), ("std", float(out_std))))
        w = b.new_param(f"{prefix}.W{name}", TensorType(dtype, (n_in, d_model)), init, "weight", call.loc)
        out = b.apply_op("matmul", [x, w], {}, call)
        if bias:
            out = b.apply_op("add", [out, b.new_param(f"{prefix}.b{name}", TensorType(dtype, (d_model,)),
                                                      ("zeros", ()), "bias", call.loc)], {}, call)
        return out

    lead, t, width = shape[:-2], shape[-2], d_model // heads
    split = lead + (t, heads, width)
    order = tuple(range(len(lead))) + tuple(len(lead) + a for a in (1, 0, 2))   # [.., H, T, D]
    qkv = [b.apply_op("transpose", [b.apply_op("reshape", [project(x, n, c)], {"shape": split}, call)],
                      {"axes": order}, call) for n in "qkv"]
    stream = 0
    if p > 0:
        b.random_streams += 1
        stream = b.random_streams - 1
    y = b.apply_op("attention", qkv, {"causal": options.get("causal", True), "dropout": p,
                                      "stream": stream}, call)
    merged = b.apply_op("reshape", [b.apply_op("transpose", [y], {"axes": order}, call)],
                        {"shape": lead + (t, d_model)}, call)
    return project(merged, "o", d_model)


def _option_locs(call: ast.Call, positional: dict[str, int]) -> dict:
    """Where each option of a layer is written, so an op's complaint about one points at it."""
    locs = {name: call.args[i].loc for name, i in positional.items() if i < len(call.args)}
    return locs | {k.name: k.value.loc for k in call.kwargs}


LAYERS = {"linear": Layer("linear", _linear_layer, "linear(x, n, bias=true, std=kaiming)"),
          "embedding": Layer("embedding", _embedding_layer, "embedding(x, vocab, dim)"),
          "layernorm": Layer("layernorm", _layernorm_layer, "layernorm(x, eps=1e-5, bias=true)"),
          "batchnorm": Layer("batchnorm", _batchnorm_layer, "batchnorm(x, eps=1e-5, momentum=0.1)"),
          "conv": Layer("conv", _conv_layer,
                        "conv(x, out_channels, kernel, stride=1, padding=0, dilation=1, bias=true)"),
          "max_pool": Layer("max_pool", _pool_layer("max_pool2d"),
                            "max_pool(x, kernel, stride=kernel, padding=0)"),
          "avg_pool": Layer("avg_pool", _pool_layer("avg_pool2d"),
                            "avg_pool(x, kernel, stride=kernel, padding=0)"),
          "multihead_attention": Layer("multihead_attention", _multihead_attention_layer,
                                       "multihead_attention(x, d_model, heads, causal=true, bias=true, "
                                       "dropout=0.0, out_std=0.02)"),
          "positional_embedding": Layer("positional_embedding", _positional_embedding_layer,
                                        "positional_embedding(T, dim)")}


def is_layer_call(call: ast.Call, is_tensor: Callable[[str], bool]) -> bool:
    """Does this call create parameters? `linear(x, 10)` is the layer, `linear(x, W)` the op;
    `embedding(x, 1000, 16)` the layer, `embedding(x, E)` the op."""
    if call.func == "batchnorm":
        return len(call.args) == 1       # with its four parameters given, it declares none
    if call.func not in ("linear", "embedding"):
        return call.func in LAYERS
    if len(call.args) != 2:
        return call.func == "embedding"
    size = call.args[1]
    return isinstance(size, ast.Number) or (isinstance(size, ast.Var) and not is_tensor(size.name))


def unknown_dtype(name: str) -> str | None:
    return did_you_mean(name, [d.value for d in DType])
