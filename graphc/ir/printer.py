"""Printing graphs: one node per line for people, Graphviz DOT for pictures."""
from __future__ import annotations

from graphc.ir.node import Graph, Node
from graphc.ir.ops import OPS
from graphc.ir.types import format_shape


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


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def format_dot(graph: Graph) -> str:
    """DOT text; nodes are coloured by the source line that produced them."""
    nxg = graph.to_networkx()
    palette = ["#e3f2fd", "#fce4ec", "#e8f5e9", "#fff3e0", "#ede7f6", "#e0f7fa", "#f9fbe7",
               "#efebe9"]
    lines_seen: dict[int, str] = {}
    out = [f'digraph "{_dot_escape(graph.name)}" {{', "  rankdir=TB;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=9];']
    for idx, data in nxg.nodes(data=True):
        n: Node = data["node"]
        title = n.op if not n.name else f"{n.name} = {n.op}"
        if n.op == "const":
            title = f"const {n.attr['value']!r}"
        label = f"{_dot_escape(title)}\\n{n.type}"
        line = n.loc.line if n.loc else 0
        colour = lines_seen.setdefault(line, palette[len(lines_seen) % len(palette)])
        shape = ", shape=ellipse" if n.op in ("input", "param", "state") else ""
        tip = f", tooltip=\"{_dot_escape(_where(n))}\"" if n.loc else ""
        out.append(f'  n{idx} [label="{label}", fillcolor="{colour}"{shape}{tip}];')
    for a, b in nxg.edges():
        src = nxg.nodes[a]["node"]
        out.append(f'  n{a} -> n{b} [label="{format_shape(src.type.shape)}"];')
    ids = {id(data["node"]): idx for idx, data in nxg.nodes(data=True)}
    for name, node in graph.outputs:
        out.append(f'  out_{_safe(name)} [label="{_dot_escape(name)}", shape=plaintext];')
        out.append(f"  n{ids[id(node)]} -> out_{_safe(name)};")
    out.append("}")
    return "\n".join(out) + "\n"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
