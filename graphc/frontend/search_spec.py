"""The `search` block: the hyperparameter space (choice, uniform, loguniform over the train
block's settings and optimizer options) and how to search it, checked with errors at the
offending line and resolved into a plain `SearchConfig` that the search engine consumes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from graphc.errors import GraphcError, SourceLoc, SourceText, did_you_mean
from graphc.frontend import ast
from graphc.frontend.settings import SettingsChecker
from graphc.frontend.train_spec import OPTIMIZER_OPTIONS, SETTINGS
from graphc.options import Opt
from graphc.train_config import TrainConfig

METHODS = ("random", "grid", "coarse_to_fine")
# What the train loop reports after each epoch (and at the end), and which way is better.
METRICS = {"val_loss": "min", "val_accuracy": "max", "loss": "min"}
DISTRIBUTIONS = ("choice", "uniform", "loguniform")
# Train settings a search may vary; every option of the train block's optimizer may vary too.
SEARCHABLE = ("batch", "epochs", "clip_grad_value", "clip_grad_norm")

# The search's own settings: (what it is, its rule).
OPTIONS = {
    "trials": ("the number of trials (per round)", Opt("int", None, low=1)),
    "method": ("the search method", Opt("choice", "random", choices=METHODS)),
    "rounds": ("the number of coarse-to-fine rounds", Opt("int", None, low=1)),
    "keep": ("the trials a coarse-to-fine round re-centres on", Opt("int", None, low=1)),
    "metric": ("the metric", Opt("choice", "val_loss", choices=tuple(METRICS))),
    "seed": ("the search seed", Opt("int", None, low=0)),
    "halving": ("the successive-halving factor", Opt("int", None, low=2)),
}
DEFAULT_TRIALS, DEFAULT_ROUNDS, DEFAULT_KEEP = 10, 2, 3


@dataclass(frozen=True)
class Dimension:
    """One axis of the space: `values` for a choice, [low, high] for the continuous ones."""
    name: str
    kind: str                      # choice | uniform | loguniform
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    integer: bool = False          # the setting takes whole numbers: samples are rounded
    optimizer: bool = False        # an option of the optimizer, not a train setting

    def to_json(self) -> dict:
        return {"kind": self.kind, "values": list(self.values), "low": self.low,
                "high": self.high, "integer": self.integer, "optimizer": self.optimizer}

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice({', '.join(str(v) for v in self.values)})"
        return f"{self.kind}({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class SearchConfig:
    model: str
    space: dict[str, Dimension]
    method: str = "random"
    trials: int = DEFAULT_TRIALS
    rounds: int = 1
    keep: int = DEFAULT_KEEP
    metric: str = "val_loss"
    seed: int = 0
    halving: int | None = None     # successive halving: keep the best 1/halving at each milestone
    # As written, for resolving again after command-line overrides, and where, for errors.
    written: dict[str, Any] = field(default_factory=dict, compare=False)
    default_seed: int = 0          # the train block's seed, when the block sets none
    locs: dict[str, SourceLoc] = field(default_factory=dict, compare=False)
    block: SourceLoc | None = field(default=None, compare=False)

    @property
    def maximize(self) -> bool:
        return METRICS[self.metric] == "max"

    def summary(self) -> str:
        """One line for `graphc check`: the space, then how it is searched."""
        space = ", ".join(f"{k}={d.describe()}" for k, d in self.space.items())
        how = f"{self.method}, {self.trials} trials"
        if self.method == "coarse_to_fine":
            how += f" x {self.rounds} rounds (keep {self.keep})"
        if self.halving:
            how += f", halving {self.halving}"
        return f"{space}; {how}, metric {self.metric}, seed {self.seed}"

    def to_json(self) -> dict:
        return {"model": self.model, "space": {k: d.to_json() for k, d in self.space.items()},
                "method": self.method, "trials": self.trials, "rounds": self.rounds,
                "keep": self.keep, "metric": self.metric, "seed": self.seed,
                "halving": self.halving}


def check_search(search: ast.Search, src: SourceText, train: TrainConfig) -> SearchConfig:
    """Check every setting of a search block against the train block it varies; all mistakes of
    the block in one GraphcError."""
    checker = SettingsChecker(src)
    optimizer = train.optimizer.name
    options: dict[str, Any] = {}
    space: dict[str, Dimension] = {}
    locs: dict[str, SourceLoc] = {}
    for s in search.settings:
        try:
            if s.name in locs:
                checker.fail(f"'{s.name}' is set twice (first at line {locs[s.name].line})", s.loc)
            locs[s.name] = s.loc
            if s.name in OPTIONS:
                if isinstance(s.value, ast.Call) and s.value.func in DISTRIBUTIONS:
                    checker.fail(f"{s.name} is {OPTIONS[s.name][0]}, not a hyperparameter: "
                                 f"it takes one value", s.value.loc,
                                 "each trial's training seed is derived from the search seed"
                                 if s.name == "seed" else None)
                options[s.name] = checker.scalar(s.name, OPTIONS[s.name][1], s.value)
            else:
                space[s.name] = _dimension(checker, s, optimizer)
        except GraphcError as err:
            checker.errors.extend(err.diagnostics)
    if not space and not checker.errors:
        checker.errors.append(src.diagnostic(
            f"search {search.model}: nothing to search", search.name_loc,
            "add a space entry, for example lr = loguniform(1e-4, 1e-1)"))
    if checker.errors:
        raise GraphcError(checker.errors)
    config = SearchConfig(search.model, space, default_seed=train.seed, locs=locs,
                          written=options, block=search.name_loc)
    return resolve(config, src)


def _dimension(checker: SettingsChecker, s: ast.Setting, optimizer: str) -> Dimension:
    opt, is_optimizer = _target(checker, s, optimizer)
    expr = s.value
    if not isinstance(expr, ast.Call) or expr.func not in DISTRIBUTIONS:
        checker.fail(f"{s.name}: a search space is choice(...), uniform(low, high) or "
                     f"loguniform(low, high)", expr.loc,
                     "to fix a value instead, set it in the train block")
    if expr.kwargs:
        checker.fail(f"{expr.func} takes no named options", expr.kwargs[0].loc)
    what = f"{s.name} ({'option of ' + optimizer if is_optimizer else 'train setting'})"
    integer = opt.kind == "int"
    if expr.func == "choice":
        if not expr.args:
            checker.fail("choice needs at least one value", expr.loc)
        values = tuple(checker.scalar(what, opt, a) for a in expr.args)
        if len(set(values)) != len(values):
            checker.fail(f"{s.name}: choice lists a value twice", expr.loc)
        return Dimension(s.name, "choice", values, integer=integer, optimizer=is_optimizer)
    if len(expr.args) != 2:
        checker.fail(f"{expr.func} takes two bounds, low and high, got {len(expr.args)}",
                     expr.loc, f"for example {s.name} = {expr.func}(1e-4, 1e-1)")
    low, high = (checker.scalar(what, opt, a) for a in expr.args)
    if not low < high:
        checker.fail(f"{expr.func}: the low bound must be below the high bound, got {low} and "
                     f"{high}", expr.loc)
    if expr.func == "loguniform" and low <= 0:
        checker.fail(f"loguniform: the bounds must be positive, got {low}", expr.args[0].loc,
                     "a log scale needs positive numbers; use uniform for a range that holds 0")
    return Dimension(s.name, expr.func, (), float(low), float(high), integer, is_optimizer)


def _target(checker: SettingsChecker, s: ast.Setting, optimizer: str) -> tuple[Opt, bool]:
    """The rule of the train setting or optimizer option that a space entry varies."""
    options = OPTIMIZER_OPTIONS[optimizer]
    if s.name in options:
        return options[s.name], True
    if s.name in SEARCHABLE:
        return SETTINGS[s.name][1], False
    if s.name in SETTINGS:
        checker.fail(f"'{s.name}' cannot be searched", s.loc,
                     "each trial's seed is derived from the search seed" if s.name == "seed"
                     else f"searchable: {', '.join(list(options) + list(SEARCHABLE))}")
    known = list(OPTIONS) + list(options) + list(SEARCHABLE)
    owners = [name for name, opts in OPTIMIZER_OPTIONS.items() if s.name in opts]
    owned = " and ".join([", ".join(owners[:-1]), owners[-1]] if len(owners) > 1 else owners)
    hint = did_you_mean(s.name, known) or (
        f"{s.name} is an option of {owned}; this train block's optimizer is {optimizer}"
        if owners else f"settings: {', '.join(OPTIONS)}; space entries: "
                       f"{', '.join(list(options) + list(SEARCHABLE))}")
    checker.fail(f"unknown search setting '{s.name}'", s.loc, hint)
    raise AssertionError("internal error: fail() returned")


def resolve(config: SearchConfig, src: SourceText, **overrides) -> SearchConfig:
    """The search with the settings as written, then `overrides` (from the command line; None
    means keep), and the defaults that depend on the method; the settings are checked against
    each other."""
    given = {**config.written, **{k: v for k, v in overrides.items() if v is not None}}

    def fail(message: str, setting: str, hint: str | None = None):
        raise src.error(message, config.locs.get(setting, config.block), hint)

    method = given.get("method", "random")
    config = replace(config, method=method, trials=given.get("trials", DEFAULT_TRIALS),
                     keep=given.get("keep", DEFAULT_KEEP), rounds=given.get("rounds", 1),
                     metric=given.get("metric", "val_loss"), halving=given.get("halving"),
                     seed=given.get("seed", config.default_seed))
    if method != "coarse_to_fine":
        for name in ("rounds", "keep"):
            if name in given:
                fail(f"{name} applies to method = coarse_to_fine, not {method}", name,
                     "choose method = coarse_to_fine, or leave it out")
    if method == "grid":
        for dim in config.space.values():
            if dim.kind != "choice":
                fail(f"grid search runs listed values: {dim.name} is {dim.describe()}", dim.name,
                     f"list the values, for example {dim.name} = choice(...), or use "
                     f"method = random")
        if "trials" in given:
            fail("grid search runs every combination of the listed values; it takes no trials",
                 "trials", "leave trials out, or use method = random")
        config = replace(config, trials=math.prod(len(d.values) for d in config.space.values()))
    if method == "coarse_to_fine":
        config = replace(config, rounds=given.get("rounds", DEFAULT_ROUNDS))
        if config.keep > config.trials:
            fail(f"keep ({config.keep}) is more than the trials per round ({config.trials})",
                 "keep")
    if config.halving is not None and "epochs" in config.space:
        fail("successive halving sets each trial's epochs; epochs cannot be searched with it",
             "halving", "leave out halving, or the epochs entry")
    return config


def apply_params(train: TrainConfig, space: dict[str, Dimension], params: dict) -> TrainConfig:
    """The train block with one trial's values in place."""
    options = {k: v for k, v in params.items() if space[k].optimizer}
    settings = {k: v for k, v in params.items() if not space[k].optimizer}
    return replace(train, optimizer=train.optimizer.with_options(**options), **settings)


def best_source(text: str, module: ast.Module, model: str, space: dict[str, Dimension],
                params: dict, header: str) -> str:
    """The source with one trial's values written into `model`'s train block and its search
    block left out: a file that `graphc train` trains as is."""
    train = next(t for t in module.trains if t.model == model)
    search = next(s for s in module.searches if s.model == model)
    offsets = _line_offsets(text)

    def at(line: int, col: int) -> int:
        return offsets[line - 1] + col - 1

    written = {s.name: s for s in train.settings}
    edits: list[tuple[int, int, str]] = []
    added = []
    for name, value in params.items():
        if space[name].optimizer:
            continue
        if name in written:
            loc = written[name].value.loc
            edits.append((at(loc.line, loc.col), at(loc.end_line, loc.end_col), _literal(value)))
        else:
            added.append(f"{name} = {_literal(value)}")
    options = {k: v for k, v in params.items() if space[k].optimizer}
    if options:
        expr = written["optimizer"].value       # a train block always names its optimizer
        edits.append((at(expr.loc.line, expr.loc.col), at(expr.loc.end_line, expr.loc.end_col),
                      _optimizer_text(text, expr, options, at)))
    close = at(train.loc.end_line, train.loc.end_col) - 1          # the block's '}'
    if added:
        line_start = text.rfind("\n", 0, close) + 1
        if text[line_start:close].strip():
            edits.append((close, close, "; ".join(added) + " "))
        else:
            edits.append((line_start, line_start, "".join(f"    {a}\n" for a in added)))
    edits.append((at(search.loc.line, search.loc.col), at(search.loc.end_line, search.loc.end_col),
                  "# (the search block was here: see the search's results)"))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return header + text


def _optimizer_text(text: str, expr: ast.Expr, values: dict, at) -> str:
    """The optimizer call with `values` in place of (or beside) the options written."""
    if isinstance(expr, ast.Var):
        name, args, kwargs = expr.name, (), ()
    else:
        name, args, kwargs = expr.func, expr.args, expr.kwargs
    written = {}
    for key, arg in list(zip(OPTIMIZER_OPTIONS[name], args)) + [(k.name, k.value) for k in kwargs]:
        written[key] = text[at(arg.loc.line, arg.loc.col):at(arg.loc.end_line, arg.loc.end_col)]
    merged = {**written, **{k: _literal(v) for k, v in values.items()}}
    ordered = [k for k in OPTIMIZER_OPTIONS[name] if k in merged]
    return f"{name}({', '.join(f'{k}={merged[k]}' for k in ordered)})"


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _line_offsets(text: str) -> list[int]:
    offsets = [0]
    for line in text.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets
