"""The settings of train and search blocks: the value of a constant expression, and
`SettingsChecker`, which checks a value or a call such as `adam(lr=1e-3)`
against their specs (`graphc.options.Opt`)."""
from __future__ import annotations

import math
from typing import Any

from graphc.errors import Diagnostic, GraphcError, SourceText, did_you_mean
from graphc.frontend import ast
from graphc.frontend.limits import MAX_INT
from graphc.options import Opt

_ARITH = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "div": lambda a, b: a / b if b else None}


def constant_value(expr: ast.Expr):
    """The value of a constant setting: a literal, or arithmetic on numbers (`1e-3 * 2`)."""
    if isinstance(expr, (ast.Number, ast.Bool, ast.String)):
        return expr.value
    if isinstance(expr, ast.Neg):
        inner = constant_value(expr.operand)
        return -inner if isinstance(inner, (int, float)) and not isinstance(inner, bool) else None
    if isinstance(expr, ast.BinOp) and expr.op in _ARITH:
        a, b = constant_value(expr.left), constant_value(expr.right)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            try:
                return _ARITH[expr.op](a, b)
            except OverflowError:     # a huge integer divided: too large for a float
                return math.inf
    return None


class SettingsChecker:
    """Checks the settings of a block (train, search) against their `Opt`s; the first mistake
    raises a GraphcError at its location."""

    def __init__(self, src: SourceText):
        self.src = src
        self.errors: list[Diagnostic] = []

    def fail(self, message: str, loc, hint: str | None = None) -> None:
        raise GraphcError(self.src.diagnostic(message, loc, hint))

    def scalar(self, what: str, opt: Opt, expr: ast.Expr):
        if opt.kind == "choice":
            if not isinstance(expr, (ast.Var, ast.String)):
                self.fail(f"{what} must be one of {', '.join(opt.choices)}", expr.loc)
            value = expr.name if isinstance(expr, ast.Var) else expr.value
            if value not in opt.choices:
                self.fail(f"{what}: unknown value '{value}'", expr.loc,
                          did_you_mean(value, opt.choices) or f"choose {', '.join(opt.choices)}")
            return value
        value = constant_value(expr)
        if opt.kind == "bool":
            if not isinstance(value, bool):
                self.fail(f"{what} must be true or false", expr.loc)
            return value
        if opt.kind == "str":
            if not isinstance(value, str):
                self.fail(f"{what} must be a string in double quotes", expr.loc)
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"{what} must be {'an integer' if opt.kind == 'int' else 'a number'}",
                      expr.loc)
        if opt.kind == "int" and not isinstance(value, int):
            self.fail(f"{what} must be an integer, got {value}", expr.loc)
        if isinstance(value, float) and not math.isfinite(value) or \
                isinstance(value, int) and abs(value) > MAX_INT:
            self.fail(f"{what} must be a finite number no larger than "
                      f"{'2**63 - 1' if isinstance(value, int) else 'about 1.8e308'}", expr.loc)
        self.check_range(what, opt, value, expr)
        return value

    def check_range(self, what: str, opt: Opt, value, expr) -> None:
        low_bad = opt.low is not None and (value < opt.low or (opt.low_open and value == opt.low))
        high_bad = opt.high is not None and (value > opt.high or (opt.high_open and value == opt.high))
        if low_bad or high_bad:
            lo = "" if opt.low is None else f"{'(' if opt.low_open else '['}{opt.low}"
            hi = "" if opt.high is None else f"{opt.high}{')' if opt.high_open else ']'}"
            if opt.high is None:
                rule = f"> {opt.low}" if opt.low_open else f">= {opt.low}"
            else:
                rule = f"in {lo or '(-inf'}, {hi}"
            self.fail(f"{what} must be {rule}, got {value}", expr.loc)

    def call(self, setting: str, noun: str, table: dict, expr: ast.Expr):
        if isinstance(expr, ast.Var):
            name, args, kwargs = expr.name, (), ()
            name_loc = expr.loc
        elif isinstance(expr, ast.Call):
            name, args, kwargs, name_loc = expr.func, expr.args, expr.kwargs, expr.func_loc
        else:
            self.fail(f"{setting} must be a {noun} such as {next(iter(table))}", expr.loc)
        if name not in table:
            self.fail(f"unknown {noun} '{name}'", name_loc,
                      did_you_mean(name, table) or f"choose one of: {', '.join(table)}")
        opts = table[name]
        names = list(opts)
        if len(args) > len(names):
            self.fail(f"{name} takes at most {len(names)} positional argument"
                      f"{'s' if len(names) != 1 else ''}, got {len(args)}", expr.loc)
        values: dict[str, Any] = {}
        for key, arg in list(zip(names, args)) + [(k.name, k.value) for k in kwargs]:
            if key not in opts:
                takes = f"{name} takes {', '.join(names)}" if names else f"{name} takes no options"
                guess = did_you_mean(key, names)
                self.fail(f"{name} has no option '{key}'", arg.loc,
                          f"{guess} ({takes})" if guess else takes)
            if key in values:
                self.fail(f"{name}: {key} is given twice", arg.loc)
            values[key] = self.scalar(f"{name}: {key}", opts[key], arg)
        for key, opt in opts.items():
            if key not in values:
                if opt.required:
                    self.fail(f"{name} needs {key}", expr.loc,
                              f"for example {name}({key}=...)")
                values[key] = opt.default
        return name, values
