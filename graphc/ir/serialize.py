"""Graphs to and from versioned JSON. Loading rebuilds every node through the op table, so a
file can name only known ops with checked attributes, and types are re-derived, not trusted."""
from __future__ import annotations

from typing import Any

from graphc.errors import GraphcError, SourceLoc, error
from graphc.files import is_safe_name, short
from graphc.ir import ops as op_table
from graphc.ir.node import Graph, Node, freeze_attrs
from graphc.ir.types import DTYPE_NAMES, TensorType

FORMAT = "graphc-graph"
VERSION = 1


def type_to_json(t: TensorType) -> list:
    return [t.dtype.value, list(t.shape)]


def type_from_json(data) -> TensorType:
    dtype, shape = data
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}")
    dims = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d < 0):
            raise ValueError(f"bad dimension {short(repr(d))}")
        dims.append(d)
    return TensorType(DTYPE_NAMES[dtype], tuple(dims))


def _attr_from_json(v):
    return tuple(_attr_from_json(x) for x in v) if isinstance(v, list) else v


def _attr_to_json(v):
    return [_attr_to_json(x) for x in v] if isinstance(v, tuple) else v


def graph_to_json(graph: Graph) -> dict:
    nodes = graph.nodes()
    ids = {id(n): i for i, n in enumerate(nodes)}
    return {
        "name": graph.name,
        "mode": graph.mode,
        "nodes": [{"op": n.op, "inputs": [ids[id(i)] for i in n.inputs],
                   "attrs": {k: _attr_to_json(v) for k, v in n.attrs},
                   "type": type_to_json(n.type), "name": n.name,
                   "loc": n.loc.to_json() if n.loc else None, "tags": sorted(n.tags)}
                  for n in nodes],
        "outputs": [[name, ids[id(node)]] for name, node in graph.outputs],
    }


def _is_index(ref, size: int) -> bool:
    return isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < size


def _node_from_json(entry: dict, built: list[Node]) -> Node:
    op_name = entry["op"]
    if op_name not in op_table.OPS:
        raise ValueError(f"unknown op {op_name!r}")
    op = op_table.OPS[op_name]
    attrs: dict[str, Any] = dict(entry.get("attrs") or {})
    unknown = set(attrs) - set(op.attrs)
    if unknown:
        raise ValueError(f"op {op_name} has no attribute {sorted(unknown)[0]!r}")
    attrs = {k: _attr_from_json(v) for k, v in attrs.items()}
    for key, value in attrs.items():
        if not op_table.attr_fits(op.attrs[key], value):
            raise ValueError(f"attribute {key} of {op_name} must be of kind "
                             f"{op.attrs[key].kind}, not {value!r}")
    inputs = []
    for ref in entry["inputs"]:
        if not _is_index(ref, len(built)):
            raise ValueError(f"input {ref!r} does not name an earlier node")
        inputs.append(built[ref])
    ttype = type_from_json(entry["type"])
    loc = SourceLoc.from_json(entry.get("loc"))
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"name {short(repr(name))} is not a string")
    tags = frozenset(str(t) for t in entry.get("tags") or ())
    if op.kind == "source":
        if inputs:
            raise ValueError(f"{op_name} takes no inputs")
        missing = [k for k, spec in op.attrs.items() if spec.required and k not in attrs]
        if missing:
            raise ValueError(f"{op_name} needs attribute {missing[0]!r}")
        return Node(op_name, (), freeze_attrs(op_table.resolve_attrs(op, attrs)), ttype, loc, name,
                    tags)
    try:
        node = op_table.apply(op_name, inputs, attrs, loc=loc, name=name, tags=tags)
    except op_table.TypeError_ as err:
        raise ValueError(f"{op_name} does not type-check: {err.message}") from None
    if node.type != ttype:
        raise ValueError(f"{op_name} is recorded as {ttype} but computes {node.type}")
    return node


def graph_from_json(data: dict, what: str = "graph") -> Graph:
    """Rebuild a graph; any inconsistency is a `GraphcError` naming the node."""
    built: list[Node] = []
    try:
        for i, entry in enumerate(data["nodes"]):
            try:
                built.append(_node_from_json(entry, built))
            except (ValueError, KeyError, TypeError, AssertionError) as err:
                raise ValueError(f"node {i}: {err}") from None
        outputs = []
        for name, ref in data["outputs"]:
            if not is_safe_name(name) or not _is_index(ref, len(built)):
                raise ValueError(f"output {short(repr(name))} -> {short(repr(ref))} does not "
                                 f"name a node by a name graphc makes")
            outputs.append((name, built[ref]))
        return Graph(str(data["name"]), tuple(outputs), str(data.get("mode", "eval")))
    except GraphcError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise error(f"{what} is malformed: {err}") from None
