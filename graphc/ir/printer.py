"""Printing graphs: one node per line for people (graphc/draw.py makes the pictures)."""
from __future__ import annotations

from graphc.ir.node import Graph, Node
from graphc.ir.ops import OPS


def _attrs_text(node: Node) -> str:
    specs = OPS[node.op].attrs
    shown = {k: v for k, v in node.attrs if k != "name" and v != specs[k].default}
    if not shown:
        return ""
    parts = []
    for k, v in shown.items():
        if isinstance(v, tuple):
            v = "[" + ", ".join(str(x) for x in v) + "]"
        parts.append(f"{k}={v}")
    return " {" + ", ".join(parts) + "}"


def _where(node: Node) -> str:
    if node.loc is None:
        return ""
    tags = "".join(f" ({t})" for t in sorted(node.tags))   # gradient, update
    return f"{node.loc.file}:{node.loc.line}{tags}"


def format_graph(graph: Graph) -> str:
    nodes = graph.nodes()
    ids = {id(n): f"%{i}" for i, n in enumerate(nodes)}
    rows = []
    for n in nodes:
        if n.op == "const":
            expr = f"const {n.attr['value']!r}"
        elif n.op in ("input", "param", "state"):
            expr = n.op
        else:
            expr = f"{n.op}({', '.join(ids[id(i)] for i in n.inputs)}){_attrs_text(n)}"
        rows.append((ids[id(n)], n.name or "", expr, str(n.type), _where(n)))
    widths = [max((len(r[c]) for r in rows), default=0) for c in range(4)]
    lines = [f"graph {graph.name} ({graph.mode}): {len(nodes)} nodes"]
    for r in rows:
        lines.append("  " + "  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
    for name, node in graph.outputs:
        lines.append(f"  output {name} = {ids[id(node)]}")
    return "\n".join(line.rstrip() for line in lines)
