"""lark parse tree -> graphc AST, with a source span on every node. Pipelines are desugared here:
`a -> f(b)` becomes the call `f(a, b)` marked as piped; number literals are read within bounds."""
from __future__ import annotations

import math

import lark
from lark import Token, Tree

from graphc.errors import GraphcError, SourceLoc, SourceText
from graphc.frontend import ast
from graphc.frontend.limits import MAX_INT
from graphc.ir.types import MAX_DIM

_BINOPS = {"add", "sub", "mul", "div", "matmul", "pow"}
_COMPARE = {">": "greater", ">=": "greater_equal", "<": "less", "<=": "less_equal",
            "==": "equal", "!=": "not_equal"}
# The rules of the grammar that are expressions: each is one level of nesting.
EXPRESSION_RULES = frozenset({"number", "string", "true", "false", "var", "call", "list", "neg",
                              "compare", "pipeline", "stage_name", "stage_call", "kwarg",
                              "unary", *_BINOPS})


class ToAst:
    def __init__(self, src: SourceText):
        self.src = src
        self.path = src.path

    def loc(self, item) -> SourceLoc:
        if isinstance(item, Token):
            return SourceLoc(self.path, item.line, item.column, item.end_line, item.end_column)
        m = item.meta
        return SourceLoc(self.path, m.line, m.column, m.end_line, m.end_column)

    def span(self, first: SourceLoc, last: SourceLoc) -> SourceLoc:
        return SourceLoc(self.path, first.line, first.col, last.end_line, last.end_col)

    # --- top level --------------------------------------------------------------------------------

    def module(self, tree: Tree) -> ast.Module:
        mod = ast.Module(self.path)
        for item in tree.children:
            if item.data == "model":
                mod.models.append(self.model(item))
            elif item.data in ("train", "search"):
                name, *settings = item.children
                block = ast.Train if item.data == "train" else ast.Search
                blocks = mod.trains if item.data == "train" else mod.searches
                blocks.append(block(str(name), tuple(self.setting(s) for s in settings),
                                    self.loc(item), self.loc(name)))
            else:
                name, *rest = item.children
                params = [p for p in rest[:-1] if p is not None]
                mod.defs.append(ast.Def(str(name), tuple(str(p) for p in params),
                                        self.expr(rest[-1]), self.loc(item), self.loc(name)))
        return mod

    def setting(self, tree: Tree) -> ast.Setting:
        name, value = tree.children
        return ast.Setting(str(name), self.expr(value), self.loc(tree))

    def model(self, tree: Tree) -> ast.Model:
        name, *stmts = tree.children
        return ast.Model(str(name), tuple(self.stmt(s) for s in stmts), self.loc(tree),
                         self.loc(name))

    def stmt(self, tree: Tree):
        kind, ch, loc = tree.data, tree.children, self.loc(tree)
        if kind == "input_decl":
            return ast.InputDecl(str(ch[0]), self.type_expr(ch[1]), loc)
        if kind == "param_decl":
            name, type_tree, init, role = ch
            return ast.ParamDecl(str(name), self.type_expr(type_tree),
                                 None if init is None else self.expr(init),
                                 None if role is None else (str(role), self.loc(role)), loc)
        if kind == "output_decl":
            items = []
            for item in ch:
                if item.data == "named_output":
                    items.append(ast.OutputItem(str(item.children[0]), self.expr(item.children[1]),
                                                self.loc(item)))
                else:
                    items.append(ast.OutputItem(None, self.expr(item.children[0]), self.loc(item)))
            return ast.OutputDecl(tuple(items), loc)
        assert kind == "binding", f"internal error: unknown statement {kind}"
        return ast.Binding(str(ch[0]), self.expr(ch[1]), loc, self.loc(ch[0]))

    def type_expr(self, tree: Tree) -> ast.TypeExpr:
        dtype, *dims = tree.children
        parsed = []
        for d in dims:
            if d is None:
                continue
            tok = d.children[0]
            parsed.append((self.size(tok) if tok.type == "INT" else str(tok), self.loc(tok)))
        return ast.TypeExpr(str(dtype), self.loc(dtype), tuple(parsed), self.loc(tree))

    # --- literals ---------------------------------------------------------------------------------

    def integer(self, tok: Token) -> int:
        """An integer literal, at most MAX_INT (checked on the digits: Python will not even read
        an integer of more than 4,300 of them)."""
        digits = str(tok).lstrip("0") or "0"
        if len(digits) > len(str(MAX_INT)) or int(digits) > MAX_INT:
            raise self.too_large(tok, f"the integer {_shortened(digits)} is too large "
                                      f"(integers are at most 2**63 - 1 = {MAX_INT})")
        return int(digits)

    def size(self, tok: Token) -> int:
        digits = str(tok).lstrip("0") or "0"
        if len(digits) > len(str(MAX_DIM)) or int(digits) > MAX_DIM:
            raise self.src.error(f"the size {_shortened(digits)} is too large: a size is at most "
                                 f"{MAX_DIM:,}", self.loc(tok))
        return int(digits)

    def float(self, tok: Token) -> float:
        value = float(str(tok))
        if not math.isfinite(value):
            raise self.too_large(tok, f"the number {_shortened(str(tok))} is too large for a "
                                      f"64-bit float (at most about 1.8e308)")
        return value

    def too_large(self, tok: Token, message: str) -> GraphcError:
        return self.src.error(message, self.loc(tok),
                              "write large numbers in floating point, such as 1e30"
                              if str(tok).isdigit() else None)

    # --- expressions ------------------------------------------------------------------------------

    def args(self, children) -> tuple[tuple[ast.Expr, ...], tuple[ast.Kwarg, ...]]:
        args, kwargs = [], []
        for c in children:
            if c is None:
                continue
            if isinstance(c, Tree) and c.data == "kwarg":
                kwargs.append(ast.Kwarg(str(c.children[0]), self.expr(c.children[1]), self.loc(c)))
            else:
                args.append(self.expr(c))
        return tuple(args), tuple(kwargs)

    def expr(self, tree) -> ast.Expr:
        if isinstance(tree, Token):   # a bare token only appears for single-child rules
            raise AssertionError(f"internal error: unexpected token {tree!r}")
        kind, ch, loc = tree.data, tree.children, self.loc(tree)
        if kind == "number":
            text = str(ch[0])
            return ast.Number(loc, self.integer(ch[0]) if text.isdigit() else self.float(ch[0]),
                              text)
        if kind == "string":
            return ast.String(loc, str(ch[0])[1:-1])
        if kind in ("true", "false"):
            return ast.Bool(loc, kind == "true")
        if kind == "var":
            return ast.Var(loc, str(ch[0]))
        if kind == "call":
            args, kwargs = self.args(ch[1:])
            return ast.Call(loc, str(ch[0]), args, kwargs, self.loc(ch[0]), span=loc)
        if kind == "list":
            return ast.ListExpr(loc, tuple(self.expr(c) for c in ch if c is not None))
        if kind == "neg":
            return ast.Neg(loc, self.expr(ch[0]))
        if kind == "compare":
            left, op, right = ch
            return ast.BinOp(loc, _COMPARE[str(op)], self.expr(left), self.expr(right))
        if kind in _BINOPS:
            return ast.BinOp(loc, kind, self.expr(ch[0]), self.expr(ch[1]))
        if kind == "pipeline":
            value, stage = self.expr(ch[0]), ch[1]
            stage_loc = self.loc(stage)
            name = stage.children[0]
            if stage.data == "stage_name":
                args, kwargs = (), ()
            else:
                args, kwargs = self.args(stage.children[1:])
            return ast.Call(stage_loc, str(name), (value,) + args, kwargs, self.loc(name),
                            piped=True, span=loc)
        if kind == "unary":   # unary plus: `?unary` keeps the rule only for "+" x
            return self.expr(ch[0])
        raise AssertionError(f"internal error: unknown expression {kind}")


def _shortened(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}...{text[-6:]} ({len(text)} digits)"


def label_span(expr: ast.Expr) -> SourceLoc:
    return expr.span if isinstance(expr, ast.Call) and expr.span else expr.loc


__all__ = ["ToAst", "label_span", "lark"]
