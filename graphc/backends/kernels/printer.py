"""The kernel plan as text: buffers, then each kernel's loop space, what it reads and what it
stores (`graphc build --dump-after fuse`, and `--emit-source` for backends without code)."""
from __future__ import annotations

from graphc.backends.kernels.ir import Const, FlatIndex, Index, KernelPlan, Load, Op, SizeOf, sstr


def _strides(strides) -> str:
    return "[" + ", ".join(sstr(s) for s in strides) + "]"


def format_expr(e, loads) -> str:
    if isinstance(e, Load):
        a = loads[e.access]
        off = f"+{'+'.join(sstr(t) for t in a.offset)}" if a.offset else ""
        return f"b{a.buffer}{off}{_strides(a.strides)}"
    if isinstance(e, Const):
        return repr(e.value)
    if isinstance(e, SizeOf):
        return sstr(e.size)
    if isinstance(e, Index):
        return f"i{e.axis}"
    if isinstance(e, FlatIndex):
        return "flat"
    assert isinstance(e, Op)
    return f"{e.op}({', '.join(format_expr(a, loads) for a in e.args)})"


def format_plan(plan: KernelPlan) -> str:
    lines = [f"plan {plan.name}: {len(plan.kernels)} kernels, {len(plan.buffers)} buffers, "
             f"{len(plan.aliases)} written in place; symbols: {', '.join(plan.symbols) or 'none'}"]
    for b in plan.buffers:
        alias = f" (in place into b{plan.aliases[b.id]})" if b.id in plan.aliases else ""
        name = f" {b.name}" if b.name else ""
        lines.append(f"  b{b.id}: {b.kind}{name} {b.dtype}[{', '.join(sstr(s) for s in b.shape)}]{alias}")
    for k in plan.kernels:
        red = f" reduce {list(k.reduce_axes)}" if k.reduce_axes else ""
        blas = " (matmul: BLAS when large)" if k.matmul else ""
        if k.window_axes:
            red += f" (scatter: window offsets {list(range(len(k.space) - k.window_axes, len(k.space)))})"
        lines.append(f"{k.name}: space [{', '.join(sstr(s) for s in k.space)}]{red}{blas}  "
                     f"-- {k.label}")
        for s in k.stores:
            how = f" {s.reduce}=" if s.reduce else " ="
            lines.append(f"    b{s.access.buffer}{_strides(s.access.strides)}{how} "
                         f"{format_expr(s.expr, k.loads)}")
    lines.append("outputs: " + ", ".join(f"{name} = b{a.buffer}" for name, a, _, _ in plan.outputs))
    return "\n".join(lines)
