"""The .nn op cases that a backend is compared on against the numpy backend: each a tiny model
whose outputs exercise one op (its broadcasting forms, axes, dtypes and magnitudes), with the
values to feed it. Read by tests/test_llvm_backend.py; any other backend can run the same table."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from graphc.runtime import Program


def train_batch(program: Program, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of n for `program`'s training graphs: normal features, labels among its classes."""
    out = {}
    for name, ttype in program.train_inputs.items():
        shape = [n if isinstance(d, str) else d for d in ttype.shape]
        if ttype.dtype.is_int:
            classes = program.graphs["forward"].output_map[program.outputs[0]].shape[-1]
            out[name] = rng.integers(0, classes, shape).astype(ttype.dtype.numpy)
        else:
            out[name] = rng.standard_normal(shape).astype(ttype.dtype.numpy)
    return out


def draw(rng: np.random.Generator, kind: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if kind.startswith("labels"):
        return rng.integers(0, int(kind[len("labels"):]), shape).astype(dtype)
    if dtype.kind == "i":
        return rng.integers(-20, 21, shape).astype(dtype)
    normal = rng.standard_normal(shape)
    x = {"normal": lambda: normal,
         "shifted": lambda: normal + 1.0,                       # sums without cancellation
         "pos": lambda: np.abs(normal) + 0.1,
         "unit": lambda: rng.random(shape),
         "binary": lambda: (rng.random(shape) < 0.5).astype(float),
         "round": lambda: rng.integers(-2, 3, shape).astype(float),   # ties and equal values
         "big": lambda: normal * 1e4,
         "tails": lambda: np.sign(normal) * rng.uniform(20.0, 80.0, shape),
         "tiny": lambda: normal * 1e-20,
         "huge": lambda: normal * 1e30,
         "specials": lambda: rng.choice([0.0, -0.0, 1.0, -2.0, 0.5, np.inf, -np.inf, np.nan], shape),
         "nans": lambda: np.where(rng.random(shape) < 0.1, np.nan, normal)}[kind]()
    return np.asarray(x, dtype=dtype)


@dataclass(frozen=True)
class OpCase:
    """A model whose outputs are `outputs` over the inputs declared in `inputs`
    ("NAME: TYPE [KIND]; ..."; T stands for the float dtype under test, KIND picks the values)."""
    name: str
    inputs: str
    outputs: tuple[str, ...]
    floats: bool = True          # run with T = f32 and T = f64; else once, as written
    tol: dict | None = None      # overrides the dtype's tolerance ({"atol": 0}: relative only)

    def decls(self, dtype: str) -> list[tuple[str, str, str]]:
        out = []
        for decl in self.inputs.split(";"):
            name, rest = (s.strip() for s in decl.split(":"))
            typ, _, kind = rest.partition("] ")
            out.append((name, with_dtype(typ + ("]" if kind else ""), dtype), kind.strip() or "normal"))
        return out

    def source(self, dtype: str) -> str:
        lines = [f"input {name}: {typ}" for name, typ, _ in self.decls(dtype)]
        lines += [f"output o{i} = {with_dtype(expr, dtype)}" for i, expr in enumerate(self.outputs)]
        return "model case {\n    " + "\n    ".join(lines) + "\n}\n"

    def feeds(self, program: Program, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        kinds = {name: kind for name, _, kind in self.decls("f32")}
        return {name: draw(rng, kinds[name], t.dtype.numpy,
                            tuple(n if isinstance(d, str) else d for d in t.shape))
                for name, t in program.inputs.items()}


def with_dtype(text: str, dtype: str) -> str:
    """`text` with T standing for `dtype`."""
    return re.sub(r"\bT\b", dtype, text)


def reductions(op: str) -> tuple[str, ...]:
    forms = [("a", ""), ("a", ", axis=0"), ("a", ", axis=1"), ("a", ", axis=-1"),
             ("b", ", axis=[0, 2]"), ("b", ", axis=1"), ("b", ", axis=[1, 2]"), ("b", "")]
    return tuple(f"{op}({x}{axis}{keep})" for x, axis in forms for keep in ("", ", keepdims=true")) \
        + (f"{op}(w, axis=1)", f"{op}(w)")


REDUCED = "a: T[N, 13] shifted; b: T[N, 5, 6]; w: T[N, 301] unit"
ROWS = "a: T[N, 13]; b: T[13]; c: T[N, 1]; s: T[]; d: T[N, 1, 5]; m: T[3, 1]"

OP_CASES = [
    # elementwise, one operand
    OpCase("neg", "a: T[N, 13]", ("-a", "neg(a)", "-(-a)")),
    OpCase("exp", "a: T[N, 13]", ("exp(a)", "exp(a * 10)")),
    OpCase("log", "p: T[N, 13] pos", ("log(p)", "log(p * 1000)")),
    OpCase("log1p", "p: T[N, 13] pos; u: T[N, 13] unit", ("log1p(p)", "log1p(u * 0.001)")),
    OpCase("sqrt", "p: T[N, 13] pos", ("sqrt(p)",)),
    OpCase("abs", "a: T[N, 13]", ("abs(a)",)),
    OpCase("tanh", "a: T[N, 13]", ("tanh(a)", "tanh(a * 0.01)", "tanh(a * 8)")),
    OpCase("sigmoid", "a: T[N, 13]", ("sigmoid(a)", "sigmoid(a * 8)")),
    OpCase("relu", "a: T[N, 13]", ("relu(a)", "a -> relu")),
    OpCase("stop_gradient", "a: T[N, 13]", ("stop_gradient(a)", "stop_gradient(a) * 2")),
    # elementwise, two operands, broadcasting rows, columns, scalars and rank 3
    OpCase("add", ROWS, ("a + b", "b + a", "a + c", "c + b", "a + s", "a + 1.5", "a + a", "d + m")),
    OpCase("sub", ROWS, ("a - b", "b - a", "a - c", "c - b", "s - a", "1 - a", "d - m")),
    OpCase("mul", ROWS, ("a * b", "c * a", "a * s", "a * 0.5", "a * a", "c * b", "d * m")),
    OpCase("div", "a: T[N, 13]; p: T[N, 13] pos; q: T[13] pos; r: T[N, 1] pos",
           ("a / p", "a / q", "a / r", "1 / p", "a / 3", "q / r")),
    OpCase("pow", "p: T[N, 13] pos; a: T[N, 13]; e: T[13]",
           ("p ** a", "p ** e", "a ** 2", "a ** 3", "p ** 0.5", "p ** -1", "pow(p, a)")),
    OpCase("maximum", ROWS, ("maximum(a, b)", "maximum(a, 0)", "maximum(c, b)", "maximum(a, s)")),
    OpCase("minimum", ROWS, ("minimum(a, b)", "minimum(a, 0)", "minimum(c, b)", "minimum(s, a)")),
    OpCase("compare", "r: T[N, 13] round; t: T[N, 13] round; q: T[13] round",
           ("r > t", "r >= t", "r < t", "r <= t", "r == t", "r != t", "r > q", "q <= r", "r == 0",
            "greater(r, t)", "not_equal(r, q)")),
    OpCase("where", "a: T[N, 13]; b: T[N, 13]; m: bool[N, 13]; c: T[N, 1]; q: T[13]",
           ("where(a > 0, a, b)", "where(m, a, 0.5)", "where(c > 0, a, b)", "where(m, 1, q)",
            "where(a > q, c, q)")),
    OpCase("cast", "a: T[N, 13]; i: i64[N, 13]; m: bool[N, 13]; r: T[N, 13] round",
           ("cast(a, f32)", "cast(a, f64)", "cast(a * 10, i32)", "cast(a * 10, i64)", "cast(i, T)",
            "cast(m, T)", "cast(r, bool)", "cast(i, i32)", "cast(m, i64)", "a > 0 -> cast(T)")),
    OpCase("one_hot", "y: i64[N] labels10; k: i32[N] labels7",
           ("one_hot(y, 10)", "one_hot(y, 10, dtype=T)", "one_hot(k, 7, dtype=T)",
            "one_hot(y, 10, dtype=i64)")),
    # reductions over each axis, with and without keepdims
    OpCase("sum", REDUCED, reductions("sum")),
    OpCase("mean", REDUCED, reductions("mean")),
    OpCase("max", REDUCED, reductions("max")),
    # matrix products: 2-D, vectors, batched, transposed operands, K = 1, a reduction over N
    OpCase("matmul", "a: T[N, 13]; W: T[13, 5]; V: T[5, 13]; v: T[13]; u: T[5]; a3: T[N, 3, 13]; "
                     "b3: T[N, 13, 2]; c: T[N, 1]; r: T[1, 5]; x: T[N, 33]; X: T[33, 17]",
           ("a @ W", "a @ transpose(V)", "a @ v", "u @ V", "v @ v", "a3 @ W", "a3 @ v",
            "a3 @ b3", "transpose(a) @ a", "c @ r", "x @ X", "transpose(W) @ transpose(a)",
            "matmul(x, X)")),
    # layout
    OpCase("reshape", "b: T[N, 5, 6]; a: T[N, 12]; W: T[6, 10]",
           ("reshape(b, [N, -1])", "reshape(b, [N, 30])", "reshape(a, [N, 3, 4])",
            "reshape(W, [3, 20])", "reshape(W, [-1])", "reshape(a, [N, 2, -1]) * 2")),
    OpCase("transpose", "a: T[N, 13]; b: T[N, 5, 6]",
           ("transpose(a)", "transpose(b)", "transpose(b, [1, 0, 2])", "transpose(b, [0, 2, 1])",
            "transpose(b, [2, 0, 1]) + 1", "transpose(a) * 2")),
    OpCase("concat", "a: T[N, 13]; b: T[N, 5]; W: T[2, 5]; V: T[3, 5]; b3: T[N, 5, 6]",
           ("concat(a, b, axis=1)", "concat(b, a, b, axis=-1)", "concat(W, V)",
            "concat(W, V, axis=0) * 2", "concat(b3, b3, axis=2)", "concat(b3, b3, axis=1)")),
    OpCase("broadcast_to", "c: T[N, 1]; v: T[13]; s: T[]",
           ("broadcast_to(c, [N, 13])", "broadcast_to(v, [N, 13])", "broadcast_to(c, [2, N, 13])",
            "broadcast_to(s, [N, 3])")),
    OpCase("slice", "a: T[N, 13]; b: T[N, 5, 6]; W: T[6, 10]",
           ("slice(a, 1, 2, 9)", "slice(a, -1, 0, 1)", "slice(b, 2, 1, 6)", "slice(b, 1, 4, 5)",
            "slice(W, 0, 1, 5)", "slice(a, 1, 3, 11) * slice(a, 1, 0, 8)")),
    OpCase("size", "a: T[N, 13]; b: T[N, 5, 6]",
           ("size(a)", "size(a, axis=0)", "size(b, axis=[0, 2], dtype=T)",
            "sum(a, axis=0) / size(a, axis=0, dtype=T)", "size(a, axis=1, dtype=i64)")),
    # composites
    OpCase("softmax", "a: T[N, 13]; b: T[N, 5, 6]",
           ("softmax(a, axis=1)", "softmax(a)", "softmax(a, axis=0)", "softmax(b, axis=1)")),
    OpCase("log_softmax", "a: T[N, 13]; b: T[N, 5, 6]",
           ("log_softmax(a, axis=1)", "log_softmax(a)", "log_softmax(a, axis=0)",
            "log_softmax(b, axis=1)")),
    OpCase("leaky_relu", "a: T[N, 13]",
           ("leaky_relu(a)", "leaky_relu(a, slope=0.2)", "a -> leaky_relu(0.3)")),
    OpCase("elu", "a: T[N, 13]; t: T[N, 7] tails", ("elu(a)", "elu(a, alpha=0.5)", "t -> elu", "elu(t)")),
    OpCase("softplus", "a: T[N, 13]; t: T[N, 7] tails",
           ("softplus(a)", "softplus(a, beta=2.0)", "t -> softplus", "softplus(t, beta=0.5)")),
    OpCase("swish", "a: T[N, 13]; t: T[N, 7] tails", ("swish(a)", "t -> swish")),
    OpCase("gelu", "a: T[N, 13]; t: T[N, 7] tails",
           ("gelu(a)", "gelu(a, approximate=\"tanh\")", "t -> gelu", "erf(a)", "erf(t)")),
    OpCase("batch_norm", "a: T[N, 5] shifted; g: T[5]; b: T[5]; m: T[5]; v: T[5] pos; i: T[N, 5, 3, 2]",
           ("batch_norm(a, g, b, m, v)", "batch_norm(i, g, b, m, v, eps=0.1)",
            "running_stat(a, m)", "running_stat(i, v, stat=\"var\", momentum=0.5)")),
    OpCase("embedding", "i: i64[N, 3] labels7; j: i32[N] labels7; E: T[7, 4]",
           ("embedding(i, E)", "embedding(j, E)")),
    OpCase("layer_norm", "a: T[N, 13] shifted; g: T[13]; b: T[13]; c: T[N, 3, 13]",
           ("layer_norm(a, g, b)", "layer_norm(a, g, b, eps=0.1)", "layer_norm(c, g, b)",
            "layer_norm(c, g)")),
    OpCase("prelu", "a: T[N, 13]; s: T[13] pos; b4: T[N, 3, 2, 5]; t: T[3] pos; o: T[1] pos; z: T[]",
           ("prelu(a, s)", "prelu(b4, t)", "prelu(a, o)", "prelu(a, z)")),
    OpCase("linear", "a: T[N, 13]; W: T[13, 5]; b: T[5]",
           ("linear(a, W, b)", "linear(a, W)", "relu(linear(a, W, b))")),
    OpCase("flatten", "b: T[N, 5, 6]; b4: T[N, 3, 2, 5]", ("flatten(b)", "flatten(b4)")),
    OpCase("conv2d", "x: T[N, 3, 7, 6]; w: T[4, 3, 3, 2]; b: T[4]; v: T[6, 1, 2, 3]",
           ("conv2d(x, w, b)", "conv2d(x, w, stride=2, padding=1)",
            "conv2d(x, w, b, stride=[2, 1], padding=[1, 0], dilation=2)", "conv2d(x, v, groups=3)",
            "relu(conv2d(x, w, b))")),
    OpCase("max_pool2d", "x: T[N, 3, 7, 6]; r: T[N, 2, 5, 5] round",
           ("max_pool2d(x, 2)", "max_pool2d(x, 3, stride=2, padding=1)", "x -> max_pool2d([2, 3])",
            "max_pool2d(r, 2, stride=1)")),
    OpCase("avg_pool2d", "x: T[N, 3, 7, 6]",
           ("avg_pool2d(x, 2)", "avg_pool2d(x, 3, stride=2, padding=1)", "x -> avg_pool2d([3, 2])")),
    OpCase("window", "x: T[N, 3, 7, 6]; g: T[N, 2, 2, 3, 2, 3]",
           ("window(x, kernel=[2, 3], stride=[2, 1], dilation=[1, 2]) * 2.0",
            "window_add(g, size=[5, 7], kernel=[2, 3], stride=[2, 2], dilation=[1, 1])",
            "pad(x, low=[0, 1, 2, 0], high=[0, 0, 1, 3], value=-1.5)")),
    # batched products over four axes (attention's heads), with broadcast batches and transposed
    # operands, large enough for the BLAS path
    OpCase("batched_matmul", "a: T[N, 2, 40, 48]; b: T[N, 2, 48, 36]; W: T[48, 40]; c: T[2, 40, 48]; "
                             "s: T[N, 40, 48]",
           ("a @ b", "a @ W", "c @ b", "a @ transpose(a, [0, 1, 3, 2])",
            "transpose(a, [0, 1, 3, 2]) @ a", "s @ W", "transpose(a, [0, 2, 1, 3]) @ W",
            "transpose(b, [0, 1, 3, 2]) @ transpose(a, [0, 1, 3, 2])")),
    # sequence models: causal masks, attention over [N, H, T, D], losses over [N, T, V]
    OpCase("causal_mask", "s: T[N, 2, 5, 5]; r: T[N, 7, 7]",
           ("causal_mask(s)", "softmax(causal_mask(s))", "causal_mask(r, value=0.0)",
            "causal_mask(r * 2, value=-1e4) + 1")),
    OpCase("attention", "q: T[N, 2, 5, 4]; k: T[N, 2, 5, 4]; v: T[N, 2, 5, 3]; w: T[N, 6, 4]",
           ("attention(q, k, v)", "attention(q, k, v, causal=false)", "attention(w, w, w)",
            "attention(q, k, v, dropout=0.2)")),
    OpCase("sequence_loss", "z: T[N, 6, 9]; y: i64[N, 6] labels9",
           ("cross_entropy(z, y)", "nll(log_softmax(z), y)", "cross_entropy(z * 20, y)")),
    OpCase("mse", "a: T[N, 13]; b: T[N, 13]; f: T[N]; t: T[N]", ("mse(a, b)", "mse(f, t)")),
    OpCase("nll", "z: T[N, 10]; y: i64[N] labels10",
           ("nll(log_softmax(z, axis=1), y)", "nll(z, y)")),
    OpCase("cross_entropy", "z: T[N, 10]; y: i64[N] labels10; k: i32[N] labels10",
           ("cross_entropy(z, y)", "cross_entropy(z, k)", "cross_entropy(z * 20, y)")),
    OpCase("binary_cross_entropy_with_logits", "z: T[N, 13]; t: T[N, 13] binary",
           ("binary_cross_entropy_with_logits(z * 5, t)", "binary_cross_entropy_with_logits(z, t)")),
    OpCase("l2", "a: T[N, 13]; W: T[13, 5]", ("l2(a)", "l2(a, W)", "1e-4 * l2(W)")),
    OpCase("l1", "a: T[N, 13]; W: T[13, 5]", ("l1(a)", "l1(a, W)")),
    OpCase("dropout_eval", "a: T[N, 13]", ("dropout(a, 0.3)", "a -> dropout(0.5) -> relu")),
    # what fusion makes of chains: bias + activation, long elementwise expressions
    OpCase("bias_activation", "x: T[N, 33]; W: T[33, 17]; b: T[17]",
           ("relu(x @ W + b)", "tanh(x @ W + b)", "sigmoid(x @ W + b) * 2 - 1",
            "log_softmax(x @ W + b, axis=1)")),
    OpCase("elementwise_chain", "a: T[N, 13]; b: T[13]; c: T[N, 1] pos",
           ("sigmoid(a) * tanh(b) + exp(-a * a) / (1 + abs(b))",
            "sqrt(c) * a - log(c) + maximum(a, b) ** 2", "where(a > b, a - b, (b - a) * 0.5)",
            "0.5 * a * (1 + tanh(0.7978845608 * (a + 0.044715 * a ** 3)))")),
    # magnitudes: |x| ~ 1e4 must stay finite where numpy's is; tails, tiny and huge values to
    # relative accuracy
    OpCase("large_magnitudes", "z: T[N, 13] big; t: T[N, 13] binary; y: i64[N] labels13",
           ("log_softmax(z, axis=1)", "softmax(z, axis=1)", "sigmoid(z)", "tanh(z)", "relu(z)",
            "binary_cross_entropy_with_logits(z, t)", "cross_entropy(z, y)",
            "maximum(z, 0) + log1p(exp(-abs(z)))", "exp(z)", "leaky_relu(z)",
            "max(z, axis=1, keepdims=true) - z")),
    OpCase("sigmoid_tails", "s: T[N, 13] tails",
           ("sigmoid(s)", "sigmoid(-s)", "exp(-abs(s))", "log1p(exp(-abs(s)))", "tanh(s)"),
           tol={"atol": 0.0}),
    OpCase("tiny_magnitudes", "t: T[N, 13] tiny; p: T[N, 13] pos",
           ("t * p", "t / p", "sqrt(abs(t))", "log(abs(t))", "tanh(t)", "log1p(abs(t))", "abs(t)",
            "relu(t)", "maximum(t, -t)", "t * 1e10", "softmax(t, axis=1)", "sigmoid(t)"),
           tol={"atol": 0.0}),
    OpCase("huge_magnitudes", "h: T[N, 13] huge; p: T[N, 13] pos",
           ("h * p", "h / p", "sqrt(abs(h))", "log(abs(h))", "h * 1e-30", "tanh(h)", "sigmoid(h)",
            "relu(h)", "-h"),
           tol={"atol": 0.0}),
    # IEEE specials: inf and nan through arithmetic and transcendental functions (no fast-math)
    OpCase("ieee_specials", "a: T[N, 13] specials; b: T[N, 13] specials",
           ("a + b", "a - b", "a * b", "a / b", "exp(a)", "log(a)", "sqrt(a)", "tanh(a)", "sigmoid(a)",
            "abs(a)", "-a", "log1p(a)", "a ** 2", "a > b", "a == b", "a != b", "where(a > b, a, b)")),
    OpCase("nan_propagation", "a: T[N, 13] nans; b: T[13]",
           ("maximum(a, b)", "minimum(a, 0)", "relu(a)", "max(a, axis=1)", "max(a)", "sum(a, axis=1)",
            "softmax(a, axis=1)", "a @ transpose(a)")),
    # integers and bools
    OpCase("int64", "i: i64[N, 13]; j: i64[N, 13]; r: i64[13]; m: bool[N, 13]",
           ("i + j", "i - r", "i * j", "i * 3 - 7", "-i", "abs(i)", "relu(i)", "maximum(i, r)",
            "minimum(i, 0)", "i > j", "i <= r", "i == j", "i != 0", "where(m, i, j)",
            "where(i > 0, i, 0)", "sum(i, axis=1)", "sum(i)", "sum(i, axis=0, keepdims=true)",
            "max(i, axis=0)", "max(i)", "cast(i, f32)", "cast(i, f64) / 3"), floats=False),
    OpCase("int32", "k: i32[N, 13]; l: i32[13]",
           ("k + l", "k * l", "-k", "maximum(k, 0)", "sum(k, axis=0)", "max(k, axis=1, keepdims=true)",
            "k >= l", "cast(k, i64) * 2", "reshape(k, [N, 13, 1])", "transpose(k)",
            "concat(k, k, axis=1)", "slice(k, 1, 2, 5)", "broadcast_to(l, [N, 13])"), floats=False),
    OpCase("bool", "m: bool[N, 13]; n: bool[13]",
           ("m == n", "m != n", "where(m, n, m)", "cast(m, f32)", "transpose(m)", "concat(m, m, axis=1)",
            "broadcast_to(n, [N, 13])", "reshape(m, [N, 13, 1])"), floats=False),
]


def called_ops() -> set[str]:
    """Every op the .nn cases call, by name or by operator."""
    symbols = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow", "@": "matmul",
               ">": "greater", ">=": "greater_equal", "<": "less", "<=": "less_equal",
               "==": "equal", "!=": "not_equal"}
    names = set()
    for case in OP_CASES:
        for expr in case.outputs:
            names |= set(re.findall(r"([a-z_][a-z_0-9]*)\s*\(", expr))
            names |= {symbols[s] for s in re.findall(r"\*\*|[<>=!]=|[-+*/@<>]", expr)}
            names |= set(re.findall(r"->\s*([a-z_][a-z_0-9]*)", expr))
    return names
