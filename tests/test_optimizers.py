"""The optimizers (graphc/optim.py) against an independent numpy reference of PyTorch's documented
update rules (the pseudo-code of torch.optim.SGD, Adagrad, RMSprop, Adam and AdamW), with
gradients worked out by hand. graphc's one deliberate difference, kept by the reference: weight
decay applies to parameters whose role is `weight` only, never to biases or `other` parameters."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

import graphc

STEPS = 100
CHECKPOINTS = (1, 2, 3, 10, 50, STEPS)    # steps after which the state slots are compared too
TOL = {"rtol": 1e-6, "atol": 1e-12}


# --------------------------------------------------------------------------------------------
# Reference optimizers: one function per optimizer, written from PyTorch's documented algorithm.
# Each updates `params` and `state` (dicts of arrays; state keyed "NAME#SLOT" like graphc's) in
# place for step t (1 on the first step). `decayed` names the parameters weight decay applies to.
# --------------------------------------------------------------------------------------------

def ref_sgd(params, grads, state, t, lr, decayed, momentum=0.0, nesterov=False,
            weight_decay=0.0, dampening=0.0):
    for name, theta in params.items():
        g = grads[name]
        if weight_decay != 0 and name in decayed:
            g = g + weight_decay * theta
        if momentum != 0:
            key = f"{name}#momentum_buffer"
            if t > 1:
                b = momentum * state[key] + (1 - dampening) * g
            else:
                b = g.copy()                       # the first buffer is the gradient, undamped
            state[key] = b
            g = g + momentum * b if nesterov else b
        params[name] = theta - lr * g


def ref_adagrad(params, grads, state, t, lr, decayed, eps=1e-10, initial_accumulator=0.0,
                weight_decay=0.0):
    for name, theta in params.items():
        g = grads[name]
        if weight_decay != 0 and name in decayed:
            g = g + weight_decay * theta
        key = f"{name}#sum"
        total = state.get(key, np.full_like(theta, initial_accumulator)) + g * g
        state[key] = total
        params[name] = theta - lr * g / (np.sqrt(total) + eps)


def ref_rmsprop(params, grads, state, t, lr, decayed, alpha=0.99, eps=1e-8, momentum=0.0,
                centered=False, weight_decay=0.0):
    for name, theta in params.items():
        g = grads[name]
        zero = np.zeros_like(theta)
        if weight_decay != 0 and name in decayed:
            g = g + weight_decay * theta
        v = alpha * state.get(f"{name}#square_avg", zero) + (1 - alpha) * g * g
        state[f"{name}#square_avg"] = v
        v_tilde = v
        if centered:
            g_ave = alpha * state.get(f"{name}#grad_avg", zero) + (1 - alpha) * g
            state[f"{name}#grad_avg"] = g_ave
            v_tilde = v - g_ave * g_ave
        if momentum > 0:
            b = momentum * state.get(f"{name}#momentum_buffer", zero) + g / (np.sqrt(v_tilde) + eps)
            state[f"{name}#momentum_buffer"] = b
            params[name] = theta - lr * b
        else:
            params[name] = theta - lr * g / (np.sqrt(v_tilde) + eps)


def ref_adam(params, grads, state, t, lr, decayed, beta1=0.9, beta2=0.999, eps=1e-8,
             weight_decay=0.0, amsgrad=False):
    for name, theta in params.items():
        g = grads[name]
        zero = np.zeros_like(theta)
        if weight_decay != 0 and name in decayed:
            g = g + weight_decay * theta
        m = beta1 * state.get(f"{name}#exp_avg", zero) + (1 - beta1) * g
        v = beta2 * state.get(f"{name}#exp_avg_sq", zero) + (1 - beta2) * g * g
        state[f"{name}#exp_avg"], state[f"{name}#exp_avg_sq"] = m, v
        m_hat = m / (1 - beta1 ** t)
        if amsgrad:
            v_max = np.maximum(state.get(f"{name}#max_exp_avg_sq", zero), v)
            state[f"{name}#max_exp_avg_sq"] = v_max
            v_hat = v_max / (1 - beta2 ** t)
        else:
            v_hat = v / (1 - beta2 ** t)
        params[name] = theta - lr * m_hat / (np.sqrt(v_hat) + eps)


def ref_adamw(params, grads, state, t, lr, decayed, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.01):
    for name, theta in params.items():
        if name in decayed:
            theta = theta - lr * weight_decay * theta      # decoupled: shrink, then Adam
        g = grads[name]
        zero = np.zeros_like(theta)
        m = beta1 * state.get(f"{name}#exp_avg", zero) + (1 - beta1) * g
        v = beta2 * state.get(f"{name}#exp_avg_sq", zero) + (1 - beta2) * g * g
        state[f"{name}#exp_avg"], state[f"{name}#exp_avg_sq"] = m, v
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        params[name] = theta - lr * m_hat / (np.sqrt(v_hat) + eps)


REFERENCE = {"sgd": ref_sgd, "adagrad": ref_adagrad, "rmsprop": ref_rmsprop, "adam": ref_adam,
             "adamw": ref_adamw}


# --------------------------------------------------------------------------------------------
# Models, with their losses and gradients derived by hand.
# --------------------------------------------------------------------------------------------

def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy_and_dz(z, y):
    """Mean cross-entropy of logits z against labels y, and d loss / d z."""
    n = len(y)
    probs = softmax(z)
    loss = -np.log(probs[np.arange(n), y]).mean()
    onehot = np.zeros_like(z)
    onehot[np.arange(n), y] = 1.0
    return loss, (probs - onehot) / n


def softmax_regression(P, x, y):
    loss, dz = cross_entropy_and_dz(x @ P["W"] + P["b"], y)
    return loss, {"W": x.T @ dz, "b": dz.sum(axis=0)}


def linear_mse(P, x, t):
    f = x @ P["W"] + P["b"]
    df = 2.0 * (f - t) / f.size                       # mse averages over every element
    return np.mean((f - t) ** 2), {"W": x.T @ df, "b": df.sum(axis=0)}


def tanh_mlp(P, x, y):
    h = np.tanh(x @ P["W1"] + P["b1"])
    loss, dz = cross_entropy_and_dz(h @ P["W2"] + P["b2"], y)
    da = (dz @ P["W2"].T) * (1.0 - h * h)
    return loss, {"W1": x.T @ da, "b1": da.sum(axis=0), "W2": h.T @ dz, "b2": dz.sum(axis=0)}


@dataclass(frozen=True)
class Problem:
    source: str                    # .nn text with OPTIMIZER where the optimizer call goes
    grads: Callable                # (params, x, label) -> (loss, grads)
    roles: dict                    # the roles graphc must infer
    label: str                     # the name of the second input
    data: Callable                 # rng -> (x, labels), the whole data set


def _classes(rng, n, d, k):
    x = rng.standard_normal((n, d))
    # Noisy labels: not separable, so the gradients stay well away from zero for every step.
    y = np.argmax(x @ rng.standard_normal((d, k)) + 1.5 * rng.standard_normal((n, k)), axis=1)
    return x, y.astype(np.int64)


def _targets(rng, n, d, k):
    x = rng.standard_normal((n, d))
    return x, x @ rng.standard_normal((d, k)) + 0.5 + 0.3 * rng.standard_normal((n, k))


PROBLEMS = {
    "softmax": Problem("""
model lin {
    input x: f64[N, 5]
    input y: i64[N]
    param W: f64[5, 3] = xavier()
    param b: f64[3]    = normal(std=0.1)
    output z = x @ W + b
    loss = cross_entropy(z, y)
}
train lin { optimizer = OPTIMIZER }
""", softmax_regression, {"W": "weight", "b": "bias"}, "y", lambda r: _classes(r, 64, 5, 3)),
    "mse": Problem("""
model reg {
    input x: f64[N, 4]
    input t: f64[N, 2]
    param W: f64[4, 2] = xavier()
    param b: f64[2]    = zeros()
    output f = x @ W + b
    loss = mse(f, t)
}
train reg { optimizer = OPTIMIZER }
""", linear_mse, {"W": "weight", "b": "bias"}, "t", lambda r: _targets(r, 64, 4, 2)),
    "tanh_mlp": Problem("""
model mlp {
    input x: f64[N, 4]
    input y: i64[N]
    param W1: f64[4, 6] = xavier()
    param b1: f64[6]    = normal(std=0.1)
    param W2: f64[6, 3] = xavier()
    param b2: f64[3]    = zeros()
    h = tanh(x @ W1 + b1)
    output z = h @ W2 + b2
    loss = cross_entropy(z, y)
}
train mlp { optimizer = OPTIMIZER }
""", tanh_mlp, {"W1": "weight", "b1": "bias", "W2": "weight", "b2": "bias"}, "y",
        lambda r: _classes(r, 64, 4, 3)),
}


def optimizer_call(name: str, options: dict) -> str:
    def literal(v):
        return ("true" if v else "false") if isinstance(v, bool) else repr(v)
    return f"{name}({', '.join(f'{k}={literal(v)}' for k, v in options.items())})"


def compile_problem(problem: Problem, name: str, options: dict, seed: int = 0):
    p = graphc.compile_source(problem.source.replace("OPTIMIZER", optimizer_call(name, options)),
                              seed=seed)
    assert {k: info.role for k, info in p.param_info.items()} == problem.roles
    return p


def batches(problem: Problem, seed: int, steps: int = STEPS, size: int = 16):
    """A fixed data set, and a fresh random batch of it for every step."""
    rng = np.random.default_rng(seed)
    x, labels = problem.data(rng)
    for _ in range(steps):
        idx = rng.choice(len(x), size, replace=False)
        yield x[idx], labels[idx]


def weights_of(problem: Problem) -> set[str]:
    return {name for name, role in problem.roles.items() if role == "weight"}


def assert_state_matches(p, ref_state: dict, t: int, where: str):
    slots = {k for k in p.state if k != "#step"}
    assert slots == set(ref_state), f"{where}: state slots"
    assert p.step == t and int(p.state["#step"]) == t
    for key, value in ref_state.items():
        np.testing.assert_allclose(p.state[key], value, **TOL, err_msg=f"{where}: {key}")


def run_against_reference(problem: Problem, name: str, options: dict, seed: int = 0,
                          lr_at: Callable[[int], float] | None = None):
    """Train graphc and the reference side by side on the same batches from the same start;
    compare the loss and every parameter after every step, and the state at checkpoints."""
    p = compile_problem(problem, name, options, seed)
    params = {k: v.copy() for k, v in p.params.items()}
    state: dict[str, np.ndarray] = {}
    opts = {k: v for k, v in options.items() if k != "lr"}
    for t, (x, labels) in enumerate(batches(problem, seed), start=1):
        lr = options["lr"] if lr_at is None else lr_at(t)
        p.lr = lr
        where = f"{optimizer_call(name, options)}, step {t}"
        loss, grads = problem.grads(params, x, labels)
        REFERENCE[name](params, grads, state, t, lr, weights_of(problem), **opts)
        got_loss = p.train_step(x=x, **{problem.label: labels})
        np.testing.assert_allclose(got_loss, loss, rtol=1e-10, err_msg=f"{where}: loss")
        for k, v in params.items():
            np.testing.assert_allclose(p.params[k], v, **TOL, err_msg=f"{where}: {k}")
        if t in CHECKPOINTS:
            assert_state_matches(p, state, t, where)
    return p, params, state


CASES = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3}),
    ("sgd", {"lr": 0.05, "momentum": 0.5, "dampening": 1.0}),
    ("sgd", {"lr": 0.1, "weight_decay": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.05, "momentum": 0.7, "dampening": 0.5, "weight_decay": 0.02}),
    ("adagrad", {"lr": 0.1}),
    ("adagrad", {"lr": 0.1, "initial_accumulator": 0.1}),
    ("adagrad", {"lr": 0.05, "eps": 1e-6, "initial_accumulator": 0.5, "weight_decay": 0.01}),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "centered": True}),
    ("rmsprop", {"lr": 0.005, "momentum": 0.9}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "weight_decay": 0.1}),
    ("rmsprop", {"lr": 0.005, "alpha": 0.95, "eps": 1e-6, "momentum": 0.5, "centered": True,
                 "weight_decay": 0.01}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "beta1": 0.8, "beta2": 0.9, "amsgrad": True}),
    ("adam", {"lr": 0.01, "weight_decay": 0.05}),
    ("adam", {"lr": 0.02, "beta1": 0.5, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1,
              "amsgrad": True}),
    ("adamw", {"lr": 0.01}),
    ("adamw", {"lr": 0.02, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.1}),
]
# The regression and two-layer models: nesterov, every optimizer with weight decay, and amsgrad.
OTHER_CASES = [CASES[i] for i in (2, 7, 10, 13, 15, 17, 19, 21)]


def named(cases):
    """pytest parameters (name, options), each named by its optimizer call."""
    return [pytest.param(name, options, id=optimizer_call(name, options))
            for name, options in cases]


@pytest.mark.parametrize("name, options", named(CASES))
def test_softmax_regression_matches_reference(name, options):
    run_against_reference(PROBLEMS["softmax"], name, options, seed=1)


@pytest.mark.parametrize("problem", ["mse", "tanh_mlp"])
@pytest.mark.parametrize("name, options", named(OTHER_CASES))
def test_other_models_match_reference(problem, name, options):
    run_against_reference(PROBLEMS[problem], name, options, seed=2)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_reference_gradients_match_graphc(problem):
    """The hand-written gradients agree with graphc's own (so a mismatch above is the update)."""
    prob = PROBLEMS[problem]
    p = compile_problem(prob, "sgd", {"lr": 0.1}, seed=3)
    x, labels = next(batches(prob, seed=3))
    loss, grads = prob.grads({k: v.copy() for k, v in p.params.items()}, x, labels)
    got_loss, got = p.loss_and_grads(x=x, **{prob.label: labels})
    np.testing.assert_allclose(got_loss, loss, rtol=1e-12)
    for k in grads:
        np.testing.assert_allclose(got[k], grads[k], rtol=1e-9, atol=1e-14, err_msg=k)


def test_amsgrad_maximum_is_exercised():
    """With beta2 = 0.9 the second moment falls at times, so max_exp_avg_sq leaves exp_avg_sq
    behind: the amsgrad case above really compares the maximum, not a copy."""
    p, _, state = run_against_reference(PROBLEMS["softmax"], "adam",
                                        {"lr": 0.01, "beta1": 0.8, "beta2": 0.9, "amsgrad": True}, seed=4)
    assert np.any(state["W#max_exp_avg_sq"] > state["W#exp_avg_sq"] * (1 + 1e-3))
    assert np.all(p.state["W#max_exp_avg_sq"] >= p.state["W#exp_avg_sq"])


def test_sgd_dampening_first_step_is_the_gradient():
    """PyTorch starts the momentum buffer at the first gradient itself, undamped."""
    prob = PROBLEMS["softmax"]
    p = compile_problem(prob, "sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.6}, seed=5)
    x, y = next(batches(prob, seed=5))
    _, grads = prob.grads({k: v.copy() for k, v in p.params.items()}, x, y)
    p.train_step(x=x, y=y)
    for k, g in grads.items():
        np.testing.assert_allclose(p.state[f"{k}#momentum_buffer"], g, **TOL, err_msg=k)


# --------------------------------------------------------------------------------------------
# Weight decay: weights only.
# --------------------------------------------------------------------------------------------

DECAY_MODEL = """
model wd {
    input x: f64[N, 4]
    input t: f64[N, 2]
    param W: f64[4, 2] = normal()
    param b: f64[2]    = normal()ROLE
    param s: f64[2]    = constant(1.5)
    output f = (x @ W + b) * s
    loss = mse(f, t)
}
train wd { optimizer = OPTIMIZER }
"""
DECAY_CASES = [
    ("sgd", {"lr": 0.1, "weight_decay": 0.2}),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.2}),
    ("adagrad", {"lr": 0.1, "weight_decay": 0.2}),
    ("rmsprop", {"lr": 0.01, "weight_decay": 0.2}),
    ("adam", {"lr": 0.01, "weight_decay": 0.2}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.2}),
]


@pytest.mark.parametrize("as_weight", [False, True], ids=["b bias", "b as weight"])
@pytest.mark.parametrize("name, options", named(DECAY_CASES))
def test_weight_decay_applies_to_weights_only(name, options, as_weight):
    """With x = 0 and targets equal to the output, every gradient is exactly zero: only weight
    decay moves anything. W (a matmul operand) decays; b (added) and s (a scale: role other) stay
    exactly put, unless b is declared `as weight`."""
    source = (DECAY_MODEL.replace("ROLE", " as weight" if as_weight else "")
              .replace("OPTIMIZER", optimizer_call(name, options)))
    p = graphc.compile_source(source, seed=6)
    roles = {k: info.role for k, info in p.param_info.items()}
    assert roles == {"W": "weight", "b": "weight" if as_weight else "bias", "s": "other"}
    start = {k: v.copy() for k, v in p.params.items()}
    params = {k: v.copy() for k, v in start.items()}
    state: dict[str, np.ndarray] = {}
    decayed = {k for k, r in roles.items() if r == "weight"}
    x = np.zeros((8, 4))
    opts = {k: v for k, v in options.items() if k != "lr"}
    for t in range(1, 21):
        target = np.broadcast_to(p.params["b"] * p.params["s"], (8, 2))
        _, grads = p.loss_and_grads(x=x, t=target)
        assert all(not g.any() for g in grads.values())
        p.train_step(x=x, t=target)
        REFERENCE[name](params, {k: np.zeros_like(v) for k, v in params.items()}, state, t,
                        options["lr"], decayed, **opts)
        for k, v in params.items():
            np.testing.assert_allclose(p.params[k], v, **TOL, err_msg=f"{k} at step {t}")
    np.testing.assert_array_equal(p.params["s"], start["s"])
    assert not np.allclose(p.params["W"], start["W"])
    if as_weight:
        assert not np.allclose(p.params["b"], start["b"])
    else:
        np.testing.assert_array_equal(p.params["b"], start["b"])
    if name == "sgd" and "momentum" not in options or name == "adamw":
        # Zero gradient, so plain L2 in SGD and AdamW's decoupled decay both shrink each weight
        # geometrically, by (1 - lr * weight_decay) a step.
        shrink = (1 - options["lr"] * options["weight_decay"]) ** 20
        np.testing.assert_allclose(p.params["W"], start["W"] * shrink, **TOL)
        if as_weight:
            np.testing.assert_allclose(p.params["b"], start["b"] * shrink, **TOL)


def test_scalar_parameter_trains():
    """A 0-d parameter keeps its shape () (np.ascontiguousarray would make it (1,), and the
    update `s - lr * grad` could then not write into its () buffer)."""
    source = (DECAY_MODEL.replace("ROLE", "").replace("f64[2]    = constant(1.5)",
                                                      "f64[]     = constant(1.5)")
              .replace("OPTIMIZER", "sgd(lr=0.1)"))
    p = graphc.compile_source(source, seed=6)
    assert p.params["s"].shape == ()
    rng = np.random.default_rng(10)
    x, t = rng.standard_normal((8, 4)), rng.standard_normal((8, 2))
    _, grads = p.loss_and_grads(x=x, t=t)
    start = p.params["s"].copy()
    p.train_step(x=x, t=t)
    assert p.params["s"].shape == ()
    np.testing.assert_allclose(p.params["s"], start - 0.1 * grads["s"], **TOL)
    p.params["s"] = np.float64(2.0)
    assert p.params["s"].shape == ()
    p.train_step(x=x, t=t)
    assert p.params["s"].shape == ()


# --------------------------------------------------------------------------------------------
# The learning rate is an input of the step: changing p.lr takes effect at the next step.
# --------------------------------------------------------------------------------------------

def schedule(t: int) -> float:
    """Decays, jumps back up, and has steps with lr = 0 (which must not move any parameter)."""
    if t % 17 == 0:
        return 0.0
    return (0.05 if t < 60 else 0.08) * 0.97 ** t


@pytest.mark.parametrize("name, options", named([
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adagrad", {"lr": 0.05}),
    ("rmsprop", {"lr": 0.05, "momentum": 0.5, "centered": True}),
    ("adam", {"lr": 0.05, "amsgrad": True, "weight_decay": 0.01}),
    ("adamw", {"lr": 0.05, "weight_decay": 0.1}),
]))
def test_learning_rate_changes_take_effect_at_once(name, options):
    p, _, _ = run_against_reference(PROBLEMS["softmax"], name, options, seed=7, lr_at=schedule)
    assert p.lr == schedule(STEPS)


def test_learning_rate_zero_step_moves_nothing_and_lr_starts_from_the_train_block():
    prob = PROBLEMS["softmax"]
    p = compile_problem(prob, "adam", {"lr": 0.003}, seed=8)
    assert p.lr == 0.003
    data = batches(prob, seed=8)
    x, y = next(data)
    p.train_step(x=x, y=y)
    before = {k: v.copy() for k, v in p.params.items()}
    moments = p.state["W#exp_avg"].copy()
    p.lr = 0.0
    x, y = next(data)
    p.train_step(x=x, y=y)
    for k, v in before.items():
        np.testing.assert_array_equal(p.params[k], v)
    assert not np.array_equal(p.state["W#exp_avg"], moments)    # the moments still advance
    assert p.step == 2


# --------------------------------------------------------------------------------------------
# torch.optim itself, where PyTorch is installed.
# --------------------------------------------------------------------------------------------

TORCH_CASES = [
    ("adam", {"lr": 0.01, "beta1": 0.8, "beta2": 0.99}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    # Decay in a parameter group holding the weight only, as graphc decays weights only.
    ("sgd", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05}),
    ("adagrad", {"lr": 0.1, "initial_accumulator": 0.1, "weight_decay": 0.05}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5, "centered": True, "weight_decay": 0.05}),
    ("adam", {"lr": 0.01, "beta2": 0.9, "amsgrad": True, "weight_decay": 0.05}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}),
]


def torch_optimizer(torch, name, options, W, b):
    opts = dict(options)
    decay = opts.pop("weight_decay", 0.0)
    if "beta1" in opts or "beta2" in opts:
        opts["betas"] = (opts.pop("beta1", 0.9), opts.pop("beta2", 0.999))
    if "initial_accumulator" in opts:
        opts["initial_accumulator_value"] = opts.pop("initial_accumulator")
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
           "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
           "adamw": torch.optim.AdamW}[name]
    groups = [{"params": [W], "weight_decay": decay}, {"params": [b], "weight_decay": 0.0}]
    return cls(groups, **opts)


@pytest.fixture
def torch():
    """PyTorch on one thread: these tiny problems run many times slower on several."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, options", named(TORCH_CASES))
def test_matches_torch_optim(torch, name, options):
    prob = PROBLEMS["softmax"]
    p = compile_problem(prob, name, options, seed=9)
    W = torch.tensor(p.params["W"].copy(), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(p.params["b"].copy(), dtype=torch.float64, requires_grad=True)
    opt = torch_optimizer(torch, name, options, W, b)
    for t, (x, y) in enumerate(batches(prob, seed=9), start=1):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(torch.from_numpy(x) @ W + b, torch.from_numpy(y))
        loss.backward()
        opt.step()
        got_loss = p.train_step(x=x, y=y)
        np.testing.assert_allclose(got_loss, loss.item(), rtol=1e-10)
        np.testing.assert_allclose(p.params["W"], W.detach().numpy(), **TOL, err_msg=f"W, {t}")
        np.testing.assert_allclose(p.params["b"], b.detach().numpy(), **TOL, err_msg=f"b, {t}")


# --------------------------------------------------------------------------------------------
# The registry: each optimizer is one declaration (graphc/optim.py), which the train block's
# checks read; nothing else lists optimizers or their options.
# --------------------------------------------------------------------------------------------

def test_each_optimizer_is_one_declaration_that_the_train_block_reads():
    import inspect
    from pathlib import Path

    from graphc.frontend.train_spec import SETTINGS
    from graphc.optim import OPTIMIZERS
    assert SETTINGS["optimizer"][1] == {name: o.options for name, o in OPTIMIZERS.items()}
    # Every optimizer has its reference here, whose defaults are the declared ones.
    for name, o in OPTIMIZERS.items():
        reference = inspect.signature(globals()[f"ref_{name}"]).parameters
        assert {k: reference[k].default for k in o.options if k != "lr"} == \
            {k: opt.default for k, opt in o.options.items() if k != "lr"}, name
    training_doc = (Path(__file__).parent.parent / "docs/training.md").read_text()
    for name, o in OPTIMIZERS.items():
        assert o.name == name and o.doc and "lr" in o.options and o.options["lr"].required
        # The builder takes exactly the declared options, in their (positional) order; anything
        # after them is its own keyword with a default.
        params = list(inspect.signature(o.build).parameters.values())[1:]
        assert [p.name for p in params[:len(o.options)]] == list(o.options), name
        assert all(p.default is not inspect.Parameter.empty for p in params[len(o.options):])
        assert all(opt.required or opt.default is not None for opt in o.options.values()), name
        assert f"`{name}(lr" in training_doc, f"docs/training.md does not describe {name}"


def test_an_optimizer_refuses_what_its_declaration_refuses():
    from graphc.compiler import check_source
    with pytest.raises(graphc.GraphcError, match="Nesterov momentum needs a momentum"):
        check_source("model m { input x: f32[N, 2]  param w: f32[2] = zeros()\n"
                     "  output y = x * w  loss = sum(y) }\n"
                     "train m { optimizer = sgd(lr=0.1, nesterov=true) }")
