"""The `train` block: every setting checked (known names, types, ranges) with errors at the
offending line, and resolved into a typed `TrainConfig` (graphc/train_config.py) that the compiler
and the training runtime consume."""
from __future__ import annotations

from typing import Any

from graphc.errors import GraphcError, SourceText, did_you_mean
from graphc.frontend import ast
from graphc.frontend.settings import SettingsChecker
from graphc.images import fit_problem, image_shape
from graphc.ir.node import topo_order
from graphc.ir.preprocess import SCALINGS
from graphc.optim import OPTIMIZERS
from graphc.options import NONNEGATIVE, Opt, fraction, positive
from graphc.targets import BACKEND_CHOICES, DEVICES
from graphc.train_config import (
    AugmentSpec,
    DataSpec,
    EarlyStopSpec,
    OptimizerSpec,
    ScheduleSpec,
    TrainConfig,
)

_pos, _frac, _NONNEG = positive, fraction, NONNEGATIVE

# name -> options (in positional order), as each optimizer declares them (graphc/optim.py)
OPTIMIZER_OPTIONS = {name: o.options for name, o in OPTIMIZERS.items()}
SCHEDULES = {
    "constant": {},
    "step": {"every": Opt("int", required=True, low=1), "gamma": _frac(0.1, open_high=False)},
    "exponential": {"gamma": Opt("float", required=True, low=0, low_open=True, high=1)},
    "plateau": {"patience": Opt("int", 10, low=0), "factor": _frac(0.1),
                "min_lr": Opt("float", 0.0, low=0)},
    "cosine": {"epochs": Opt("int", required=True, low=1)},
    # Per step (training by steps): nanoGPT's linear warmup, then cosine decay to min_lr by
    # `steps` (default: the train block's steps), min_lr after.
    "warmup_cosine": {"warmup": Opt("int", 0, low=0), "steps": Opt("int", None, low=1),
                      "min_lr": Opt("float", 0.0, low=0)},
}
STEP_SCHEDULES = ("constant", "warmup_cosine")
DATASETS = {"digits": {}, "mnist": {}, "fashion_mnist": {},
            "npz": {"path": Opt("str", required=True)},
            "csv": {"path": Opt("str", required=True), "label": Opt("str", required=True)},
            # characters of a text file, random windows of `context` (runtime/text_data.py)
            "text": {"path": Opt("str", required=True), "context": Opt("int", required=True, low=1)}}
EARLY_STOP = {"early_stop": {"patience": Opt("int", required=True, low=1),
                             "on": Opt("choice", "val_loss", choices=("val_loss", "val_accuracy"))}}
# Augmentations of training images (runtime/augment.py implements them, in the same order).
AUGMENTATIONS = {"shift": {"pixels": Opt("int", required=True, low=0)},
                 "rotate": {"degrees": Opt("float", required=True, low=0, high=180)},
                 "flip": {"direction": Opt("choice", required=True,
                                           choices=("horizontal", "vertical")),
                          "p": _frac(0.5, open_high=False)},
                 "noise": {"std": Opt("float", required=True, low=0)},
                 "crop": {"size": Opt("int", required=True, low=1), "pad": Opt("int", 0, low=0)}}

# setting -> (what it is, how it is checked); for calls, what one of them is called
SETTINGS = {
    "data": ("data set", DATASETS),
    "optimizer": ("optimizer", OPTIMIZER_OPTIONS),
    "schedule": ("learning-rate schedule", SCHEDULES),
    "early_stop": ("early-stopping rule", EARLY_STOP),
    "batch": ("the batch size", Opt("int", 32, low=1)),
    "epochs": ("the number of epochs", Opt("int", 10, low=1)),
    "seed": ("the random seed", Opt("int", 0, low=0)),
    "validation": ("the validation fraction", Opt("float", 0.2, low=0, high=1, low_open=True,
                                                 high_open=True)),
    "test": ("the test fraction", Opt("float", 0.2, low=0, high=1, low_open=True, high_open=True)),
    "scale": ("input scaling", Opt("choice", "unit", choices=SCALINGS)),
    # Where `graphc train` runs the step when --backend does not say (graphc.targets.backend_for).
    "device": ("the device", Opt("choice", "cpu", choices=DEVICES)),
    # The backend that runs it, where --backend does not say: auto is llvm where llvmlite loads.
    "backend": ("the backend", Opt("choice", "auto", choices=BACKEND_CHOICES)),
    # Gradient clipping before the optimizer sees the gradients (PyTorch's clip_grad_value_ and
    # clip_grad_norm_); off unless set.
    "clip_grad_value": ("the gradient clipping value", Opt("float", None, low=0, low_open=True)),
    "clip_grad_norm": ("the gradients' largest global norm", Opt("float", None, low=0, low_open=True)),
    # Random changes to each training batch's images; a list of calls, applied in order.
    "augment": ("augmentation", AUGMENTATIONS),
    # Training by steps (text data): optimizer steps, and the evaluations along the way.
    "steps": ("the number of training steps", Opt("int", None, low=1)),
    "eval_every": ("steps between evaluations", Opt("int", None, low=1)),
    "eval_batches": ("batches per evaluation", Opt("int", 20, low=1)),
}


def _check_optimizer(checker: SettingsChecker, name: str, options: dict, expr: ast.Expr) -> None:
    """Combinations of options that PyTorch refuses (each optimizer's own `refuse` rule)."""
    refuse = OPTIMIZERS[name].refuse
    refusal = refuse(options) if refuse else None
    if refusal is not None:
        checker.fail(f"{name}: {refusal[0]}", expr.loc, refusal[1])


def _check_augment(checker: SettingsChecker, expr: ast.Expr) -> list[tuple[str, dict]]:
    """`augment = [shift(2), flip(horizontal), ...]` (or one call alone): each call checked, each
    mistake reported."""
    items = expr.items if isinstance(expr, ast.ListExpr) else (expr,)
    checked = []
    for item in items:
        try:
            checked.append(_check_augmentation(checker, item))
        except GraphcError as err:
            checker.errors.extend(err.diagnostics)
    return checked


def _check_augmentation(checker: SettingsChecker, item: ast.Expr) -> tuple[str, dict]:
    if not isinstance(item, (ast.Call, ast.Var)):
        checker.fail("augment must be a list of augmentations", item.loc,
                     "for example augment = [shift(2), rotate(10), noise(0.1)]")
    name = item.func if isinstance(item, ast.Call) else item.name
    if name not in AUGMENTATIONS:
        guess = did_you_mean(name, AUGMENTATIONS)
        known = f"augmentations: {', '.join(AUGMENTATIONS)}"
        checker.fail(f"unknown augmentation '{name}'",
                     item.func_loc if isinstance(item, ast.Call) else item.loc,
                     f"{guess} ({known})" if guess else known)
    return checker.call("augment", "augmentation", AUGMENTATIONS, item)


def _check_augment_fits(checker: SettingsChecker, expr: ast.Expr, augment: list, model) -> None:
    """The augmentations against the model's features input: images of a known size, in floats."""
    seen = {n.attr["name"] for out in model.outputs.values() for n in topo_order([out])
            if n.op == "input"}
    features = [name for name in model.inputs if name in seen]
    if len(features) != 1:
        return          # not trainable by graphc train, which says so itself
    t = model.inputs[features[0]].type
    if not t.dtype.is_float:
        checker.fail(f"augment needs a float features input; {features[0]} is {t}", expr.loc)
    try:
        image = image_shape(t.shape)
    except ValueError as err:
        checker.fail(f"{err}; {features[0]} is {t}", expr.loc)
    items = expr.items if isinstance(expr, ast.ListExpr) else (expr,)
    for item, (name, options) in zip(items, augment):
        problem = fit_problem(name, options, image)
        if problem:
            option, why = problem
            at = _option_loc(item, list(AUGMENTATIONS[name]).index(option), option)
            checker.errors.append(checker.src.diagnostic(
                why, at, f"{features[0]} holds {image[0]} x {image[1]} x {image[2]} images "
                         f"(channels x height x width)"))


def _option_loc(call: ast.Expr, position: int, name: str):
    """Where option `name` (the `position`-th positional) of a call is written, else the call."""
    if isinstance(call, ast.Call):
        if position < len(call.args):
            return call.args[position].loc
        return call.kwarg_loc(name, value=True) or call.loc
    return call.loc


def _check_steps(checker: SettingsChecker, train: ast.Train, settings: dict, src: SourceText) -> None:
    """Training by steps goes with text data (random windows have no epochs), per-step schedules
    with training by steps."""
    def at(name: str):
        return next((s.loc for s in train.settings if s.name == name), train.name_loc)
    data = settings.get("data", ("digits", {}))[0]
    steps = settings.get("steps")
    schedule = settings.get("schedule", ("constant", {}))
    if data == "text" and steps is None:
        checker.errors.append(src.diagnostic(
            "text data is trained by steps: random windows of the text have no epochs",
            at("data"), "add, for example, steps = 2000"))
    if steps is not None and data != "text":
        checker.errors.append(src.diagnostic(
            f"steps trains on random windows of text data; {data} is trained by epochs",
            at("steps"), "use epochs = N, or data = text(\"FILE\", context=T)"))
    for name in ("eval_every", "eval_batches"):
        if name in settings and name in {s.name for s in train.settings} and steps is None:
            checker.errors.append(src.diagnostic(f"{name} goes with steps", at(name),
                                                 "add steps = N"))
    if steps is not None and schedule[0] not in STEP_SCHEDULES:
        checker.errors.append(src.diagnostic(
            f"schedule {schedule[0]} is stepped per epoch; training by steps takes "
            f"{' or '.join(STEP_SCHEDULES)}", at("schedule")))
    if steps is None and schedule[0] == "warmup_cosine":
        checker.errors.append(src.diagnostic("warmup_cosine is stepped per training step: it needs "
                                             "steps = N", at("schedule")))


def check_train(train: ast.Train, src: SourceText, model=None) -> TrainConfig:
    """The train block checked and resolved. With `model` (its checked ModelIR), settings that
    depend on the model (augment's image sizes) are checked against it too."""
    checker = SettingsChecker(src)
    settings: dict[str, Any] = {}      # plain values and (name, {options}) calls, as checked
    seen: dict[str, int] = {}
    for s in train.settings:
        try:
            if s.name not in SETTINGS:
                checker.fail(f"unknown train setting '{s.name}'", s.loc,
                             did_you_mean(s.name, SETTINGS) or
                             f"settings: {', '.join(SETTINGS)}")
            if s.name in seen:
                checker.fail(f"'{s.name}' is set twice (first at line {seen[s.name]})", s.loc)
            seen[s.name] = s.loc.line
            what, rule = SETTINGS[s.name]
            if s.name == "augment":
                errors = len(checker.errors)
                settings[s.name] = _check_augment(checker, s.value)
                if model is not None and settings[s.name] and len(checker.errors) == errors:
                    _check_augment_fits(checker, s.value, settings[s.name], model)
            elif isinstance(rule, Opt):
                settings[s.name] = checker.scalar(s.name, rule, s.value)
            else:
                settings[s.name] = checker.call(s.name, what, rule, s.value)
            if s.name == "optimizer":
                _check_optimizer(checker, *settings[s.name], s.value)
        except GraphcError as err:
            checker.errors.extend(err.diagnostics)
    if settings.get("device") == "cuda" and settings.get("backend") not in (None, "auto", "cuda"):
        where = next(s for s in train.settings if s.name == "backend")
        checker.errors.append(src.diagnostic(
            f"train {train.model}: device = cuda, but backend = {settings['backend']} runs on the "
            f"CPU", where.loc, "leave the backend out (or say backend = cuda) to run on the GPU"))
    _check_steps(checker, train, settings, src)
    if "optimizer" not in settings and "optimizer" not in seen:
        checker.errors.append(src.diagnostic(
            f"train {train.model}: no optimizer", train.name_loc,
            "add, for example, optimizer = adam(lr=1e-3)"))
    if checker.errors:
        raise GraphcError(checker.errors)
    for key, (_, rule) in SETTINGS.items():
        if isinstance(rule, Opt) and key not in settings:
            settings[key] = rule.default
    settings.setdefault("data", ("digits", {}))
    settings.setdefault("schedule", ("constant", {}))
    early = settings.pop("early_stop", None)
    return TrainConfig(
        train.model, optimizer=OptimizerSpec(*settings.pop("optimizer")),
        data=DataSpec(*settings.pop("data")), schedule=ScheduleSpec(*settings.pop("schedule")),
        augment=tuple(AugmentSpec(*a) for a in settings.pop("augment", ())),
        early_stop=EarlyStopSpec(*early) if early else None, written=tuple(seen), **settings)
