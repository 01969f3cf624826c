"""The .nn syntax tree. Every node carries its source span; expressions also carry `span`, the
whole text they cover (a pipeline stage points its caret at the stage but names the pipeline)."""
from __future__ import annotations

from dataclasses import dataclass, field

from graphc.errors import SourceLoc


@dataclass(frozen=True)
class Expr:
    loc: SourceLoc


@dataclass(frozen=True)
class Number(Expr):
    value: int | float
    text: str


@dataclass(frozen=True)
class String(Expr):
    value: str


@dataclass(frozen=True)
class Bool(Expr):
    value: bool


@dataclass(frozen=True)
class Var(Expr):
    name: str


@dataclass(frozen=True)
class Kwarg:
    name: str
    value: Expr
    loc: SourceLoc


@dataclass(frozen=True)
class Call(Expr):
    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[Kwarg, ...]
    func_loc: SourceLoc
    piped: bool = False          # written as `a -> f(...)`: args[0] came from the pipeline
    span: SourceLoc | None = None

    def kwarg_loc(self, name: str, value: bool = False) -> SourceLoc | None:
        """Where keyword argument `name` (or, with value=True, its value) is written."""
        for k in self.kwargs:
            if k.name == name:
                return k.value.loc if value else k.loc
        return None


@dataclass(frozen=True)
class BinOp(Expr):
    op: str                      # add sub mul div matmul pow, or a comparison (greater, ...)
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg(Expr):
    operand: Expr


@dataclass(frozen=True)
class ListExpr(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class TypeExpr:
    dtype: str
    dtype_loc: SourceLoc
    dims: tuple[tuple[int | str, SourceLoc], ...]
    loc: SourceLoc


@dataclass(frozen=True)
class InputDecl:
    name: str
    type: TypeExpr
    loc: SourceLoc


@dataclass(frozen=True)
class ParamDecl:
    name: str
    type: TypeExpr
    init: Expr | None
    role: tuple[str, SourceLoc] | None
    loc: SourceLoc


@dataclass(frozen=True)
class OutputItem:
    name: str | None
    expr: Expr
    loc: SourceLoc


@dataclass(frozen=True)
class OutputDecl:
    items: tuple[OutputItem, ...]
    loc: SourceLoc


@dataclass(frozen=True)
class Binding:
    name: str
    expr: Expr
    loc: SourceLoc
    name_loc: SourceLoc


Stmt = InputDecl | ParamDecl | OutputDecl | Binding


@dataclass(frozen=True)
class Model:
    name: str
    stmts: tuple[Stmt, ...]
    loc: SourceLoc
    name_loc: SourceLoc


@dataclass(frozen=True)
class Setting:
    name: str
    value: Expr
    loc: SourceLoc


@dataclass(frozen=True)
class Train:
    model: str
    settings: tuple[Setting, ...]
    loc: SourceLoc
    name_loc: SourceLoc


@dataclass(frozen=True)
class Search:
    """A `search MODEL { ... }` block: the hyperparameter space and how to search it."""
    model: str
    settings: tuple[Setting, ...]
    loc: SourceLoc
    name_loc: SourceLoc


@dataclass(frozen=True)
class Def:
    name: str
    params: tuple[str, ...]
    body: Expr
    loc: SourceLoc
    name_loc: SourceLoc


@dataclass
class Module:
    path: str
    models: list[Model] = field(default_factory=list)
    trains: list[Train] = field(default_factory=list)
    searches: list[Search] = field(default_factory=list)
    defs: list[Def] = field(default_factory=list)
