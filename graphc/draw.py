"""Graph pictures: a graph as Graphviz DOT (nodes coloured by the `.nn` line that made them, fused
kernels as clusters, shapes on the edges), rendered to PNG or SVG by Graphviz's `dot` program."""
from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

from graphc.errors import error
from graphc.ir.node import Graph, Node
from graphc.ir.ops import OPS
from graphc.ir.types import format_shape

# ColorBrewer's Set3 and Pastel1: light enough for black text, distinct enough side by side.
PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69",
           "#fccde5", "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f", "#fbb4ae", "#b3cde3",
           "#decbe4", "#fed9a6"]
NO_LINE = "#ffffff"                       # nodes the compiler adds (the step count, the lr input)
# How the three parts of a training step look: forward solid, backward dashed, updates bold.
PART_STYLES = {"forward": "", "gradient": ",dashed", "update": ",bold"}
PART_NAMES = {"forward": "forward", "gradient": "backward (gradient)", "update": "optimizer update"}
PART_BACKGROUND = {"forward": "#fbfbfb", "gradient": "#f1f3f6", "update": "#f6f3ee"}
LEAVES = ("input", "param", "state")
FORMATS = ("png", "svg")


def graph_dot(graph: Graph, plan=None, sources: dict[str, list[str]] | None = None) -> str:
    """DOT text for `graph`. `plan` (a kernel plan of the same graph) frames each fused kernel, one
    of two or more nodes; `sources` (file -> its lines) puts each line's text in the legend."""
    drawing = _Drawing(graph, plan)
    title = f"{graph.name} ({graph.mode}): {len(graph.nodes())} nodes"
    if plan is not None:
        title += f", {len(plan.kernels)} kernels"
    out = [f'digraph "{_esc(graph.name)}" {{',
           f'  graph [rankdir=TB, fontname="Helvetica", fontsize=18, labelloc=t, '
           f'label="{_esc(title)}", nodesep=0.25, ranksep=0.35];',
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=12, '
           'margin="0.12,0.04", height=0.3];',
           '  edge [fontname="Helvetica", fontsize=9, fontcolor="#555555", color="#666666", '
           'arrowsize=0.6];']
    out.extend(drawing.body())
    out.extend(drawing.edges())
    out.append(_legend(drawing.colours, sources or {}, drawing.parts, bool(drawing.kernels),
                       drawing.framed))
    out.append("}")
    return "\n".join(out) + "\n"


def render(dot_text: str, fmt: str, out: Path) -> None:
    """Run Graphviz's `dot` to write `out` in `fmt` (png or svg)."""
    assert fmt in FORMATS, f"internal error: no picture format {fmt!r}"
    dot = shutil.which("dot")
    if dot is None:
        raise error(f"--format {fmt} needs the `dot` program of Graphviz, which is not on PATH: "
                    f"install Graphviz (apt install graphviz, brew install graphviz, or "
                    f"https://graphviz.org/download/)")
    done = subprocess.run([dot, f"-T{fmt}", "-o", str(out)], input=dot_text, text=True,
                          capture_output=True)
    if done.returncode != 0:
        raise error(f"{out}: Graphviz's dot failed: {done.stderr.strip()}")


# --- nodes --------------------------------------------------------------------------------------

def _is_scalar_const(n: Node) -> bool:
    # Scalar constants would be dozens of tiny nodes; their values go into the consumer's label.
    return n.op == "const" and n.type.shape == ()


def _part(n: Node) -> str:
    return "update" if "update" in n.tags else "gradient" if "gradient" in n.tags else "forward"


def _line_key(n: Node) -> tuple[str, int] | None:
    return (n.loc.file, n.loc.line) if n.loc is not None else None


def _line_colours(nodes: list[Node]) -> dict[tuple[str, int], str]:
    """A colour per source line, in line order (so the legend reads like the file)."""
    keys = sorted({k for n in nodes if (k := _line_key(n)) is not None})
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}


def _node_line(n: Node, dot_id: str, colours: dict) -> str:
    key = _line_key(n)
    fill = colours[key] if key is not None else NO_LINE
    where = f"{key[0]}:{key[1]}" if key else "added by the compiler"
    if n.op in LEAVES:
        shape = "ellipse" if n.op == "param" else "box"
        extra = f', shape={shape}, style="filled{",rounded" if n.op != "param" else ""}", penwidth=1.6'
        if n.op == "state":
            extra += ', peripheries=2'
    else:
        extra = f', style="rounded,filled{PART_STYLES[_part(n)]}"'
        if "update" in n.tags:
            extra += ", penwidth=2"
    return (f'{dot_id} [label="{_esc(_node_label(n))}", fillcolor="{fill}", '
            f'tooltip="{_esc(where)}"{extra}];')


def _node_label(n: Node) -> str:
    if n.op in LEAVES:
        return f"{n.op} {n.name or n.attr.get('name', '')}".rstrip()
    if n.op == "const":
        return "const"
    call = n.op
    if any(_is_scalar_const(i) for i in n.inputs):
        call += "(" + ", ".join(_const_text(i) if _is_scalar_const(i) else "·" for i in n.inputs) + ")"
    call += _attrs_text(n)
    return f"{n.name} = {call}" if n.name else call


def _const_text(n: Node) -> str:
    value = n.attr["value"]
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _attrs_text(n: Node) -> str:
    specs = OPS[n.op].attrs
    shown = []
    for k, v in n.attrs:
        if k == "name" or v == specs[k].default:
            continue
        if isinstance(v, tuple):
            v = "[" + ", ".join(str(x) for x in v) + "]"
        shown.append(f"{k}={v}")
    return " " + " ".join(shown) if shown else ""


def _edge_label(n: Node) -> str:
    """The value's shape; its dtype too when it is not the usual f32."""
    dtype = "" if n.type.dtype.value == "f32" else n.type.dtype.value
    if not n.type.shape:
        return f"{dtype} scalar".lstrip()
    return dtype + format_shape(n.type.shape)


# --- parts and kernels ------------------------------------------------------------------------

class _Drawing:
    """Where each node goes. In a training step the forward, backward and update parts are framed
    apart, and a parameter, input or state slot is drawn once in every part that reads it (one
    long edge per use would cross the whole picture). Fused kernels are framed inside the part of
    their last node, their result."""

    def __init__(self, graph: Graph, plan):
        self.graph = graph
        outputs = {id(n) for _, n in graph.outputs}
        self.nodes = [n for n in graph.nodes() if not _is_scalar_const(n) or id(n) in outputs]
        self.base = {id(n): f"n{i}" for i, n in enumerate(self.nodes)}
        self.colours = _line_colours(self.nodes)
        self.kernels = [k for k in plan.kernels if len(k.nodes) > 1] if plan is not None else []
        self.kernel_of: dict[int, int] = {}
        for i, k in enumerate(self.kernels):
            for n in k.nodes:
                self.kernel_of.setdefault(id(n), i)   # the first, should fusion ever repeat a node
        self.part = {id(n): self._part_of(n) for n in self.nodes if n.op not in LEAVES}
        self.parts = set(self.part.values()) or {"forward"}
        self.framed = len(self.parts) > 1
        self.leaf_parts: dict[int, list[str]] = {}
        for n in self.nodes:
            for inp in n.inputs:
                if inp.op in LEAVES:
                    seen = self.leaf_parts.setdefault(id(inp), [])
                    if self.where(n) not in seen:
                        seen.append(self.where(n))

    def _part_of(self, n: Node) -> str:
        if id(n) in self.kernel_of:
            return _part(self.kernels[self.kernel_of[id(n)]].nodes[-1])
        return _part(n)

    def where(self, n: Node) -> str:
        """The part a node is drawn in (a leaf's first one)."""
        if n.op in LEAVES:
            return (self.leaf_parts.get(id(n)) or ["forward"])[0]
        return self.part[id(n)] if self.framed else "forward"

    def ref(self, n: Node, part: str) -> str:
        """The DOT id of `n` as seen from `part`: a leaf has one copy per part."""
        return f"{self.base[id(n)]}{part[0]}" if n.op in LEAVES and self.framed else self.base[id(n)]

    def body(self) -> list[str]:
        out: list[str] = []
        for part in ("forward", "gradient", "update"):
            lines = self._part_body(part)
            if self.framed and lines:
                out.append(f"  subgraph cluster_{part} {{")
                out.append(f'    graph [label="{PART_NAMES[part]}", fontsize=16, labeljust=l, '
                           f'style="rounded,filled", fillcolor="{PART_BACKGROUND[part]}", '
                           f'color="#bbbbbb"];')
                out.extend("  " + line for line in lines)
                out.append("  }")
            else:
                out.extend(lines)
        return out

    def _part_body(self, part: str) -> list[str]:
        out = []
        for n in self.nodes:
            parts = self.leaf_parts.get(id(n), ["forward"]) if n.op in LEAVES else [self.where(n)]
            if part in parts and id(n) not in self.kernel_of:
                out.append("  " + _node_line(n, self.ref(n, part), self.colours))
        for i, k in enumerate(self.kernels):
            inside = [n for n in self.nodes
                      if self.kernel_of.get(id(n)) == i and self.where(n) == part]
            if inside:
                out.append(f"  subgraph cluster_k{i} {{")
                out.append(f'    graph [label="{_esc(k.name)}", fontsize=10, fontcolor="#1f4e9e", '
                           f'style="rounded,dashed", color="#1f4e9e", penwidth=1.4, labeljust=l];')
                out.extend("    " + _node_line(n, self.ref(n, part), self.colours) for n in inside)
                out.append("  }")
        for i, (name, node) in enumerate(self.graph.outputs):
            if self.where(node) == part:
                out.append(f'  out{i} [label="{_esc(name)}", shape=plaintext, style="", '
                           f'fontsize=13];')
        return out

    def edges(self) -> list[str]:
        out = []
        for n in self.nodes:
            part = self.where(n)
            for inp in n.inputs:
                if id(inp) in self.base:
                    out.append(f'  {self.ref(inp, part)} -> {self.base[id(n)]} '
                               f'[label="{_esc(_edge_label(inp))}"];')
        for i, (_, node) in enumerate(self.graph.outputs):
            out.append(f'  {self.ref(node, self.where(node))} -> out{i} '
                       f'[label="{_esc(_edge_label(node))}"];')
        return out


# --- legend ---------------------------------------------------------------------------------------

def _legend(colours: dict, sources: dict[str, list[str]], parts: set[str], kernels: bool,
            framed: bool) -> str:
    """One table node: each source line's colour and text, then what the border styles mean."""
    rows = ['<TR><TD COLSPAN="2" ALIGN="LEFT"><B>colour = the .nn line a node comes from</B></TD></TR>']
    for (file, line), colour in colours.items():
        text = _source_text(sources, file, line)
        rows.append(f'<TR><TD BGCOLOR="{colour}" ALIGN="RIGHT">{html.escape(Path(file).name)}:{line}'
                    f'</TD><TD ALIGN="LEFT"><FONT FACE="Courier">{html.escape(text)}</FONT></TD></TR>')
    if len(parts) > 1:
        for part in ("forward", "gradient", "update"):
            if part in parts:
                style = {"forward": "solid border", "gradient": "dashed border",
                         "update": "bold border"}[part]
                rows.append(f'<TR><TD ALIGN="RIGHT">{style}</TD><TD ALIGN="LEFT">'
                            f'{PART_NAMES[part]}</TD></TR>')
    rows.append('<TR><TD ALIGN="RIGHT">ellipse / box</TD><TD ALIGN="LEFT">parameter / input '
                '(double border: optimizer state)' + (', drawn in each part that reads it' if framed else '')
                + '</TD></TR>')
    if kernels:
        rows.append('<TR><TD ALIGN="RIGHT"><FONT COLOR="#1f4e9e">dashed frame</FONT></TD>'
                    '<TD ALIGN="LEFT">one fused kernel</TD></TR>')
    table = ('<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="4">'
             + "".join(rows) + "</TABLE>>")
    return f"  legend [shape=plaintext, style=\"\", fontsize=12, label={table}];"


def _source_text(sources: dict[str, list[str]], file: str, line: int) -> str:
    lines = sources.get(file)
    if lines is None:
        try:
            lines = sources[file] = Path(file).read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            lines = sources[file] = []
    text = lines[line - 1].partition("#")[0].strip() if 0 < line <= len(lines) else ""
    return text if len(text) <= 70 else text[:67] + "..."


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
