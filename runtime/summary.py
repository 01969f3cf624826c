"""The parameter table of a model, as `graphc check` prints it and `Program.summary` returns it."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from graphc.ir.preprocess import CONSTANT_ROLE
from graphc.ir.types import format_shape


def param_table(name: str, inputs: dict, outputs: dict, loss, params: Iterable,
                init_text: Callable = None) -> str:
    """The table `graphc check` prints: inputs, outputs, loss, then one row per parameter
    (anything with name, role, type and init) and the total."""
    rows = [("parameter", "role", "shape", "dtype", "count", "init")]
    total, count_params = 0, 0
    for p in params:
        count = p.type.size()
        total += count
        count_params += 1
        init = "preprocessing" if p.role == CONSTANT_ROLE else (init_text or _init_text)(p.init)
        rows.append((p.name, p.role or "", format_shape(p.type.shape), p.type.dtype.value,
                     f"{count:,}", init))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    lines = [f"model {name}"]
    lines += [f"  input  {k}: {t}" for k, t in inputs.items()]
    lines += [f"  output {k}: {t}" for k, t in outputs.items()]
    if loss is not None:
        lines.append(f"  loss: {loss}")
    lines.append("")
    for i, r in enumerate(rows):
        cells = [r[c].rjust(widths[c]) if c == 4 else r[c].ljust(widths[c]) for c in range(6)]
        lines.append("  " + "  ".join(cells).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines.append(f"  total: {total:,} parameters in {count_params} tensors")
    return "\n".join(lines)


def _init_text(init: tuple) -> str:
    """An initializer as written, its options at their defaults left unsaid."""
    from graphc.initializers import INITIALIZERS
    name, options = init
    spec = INITIALIZERS.get(name)
    opts = ", ".join(f"{k}={v}" for k, v in options if v is not None
                     and not (spec and k in spec.choices and v == spec.options[k]))
    return f"{name}({opts})"


def summary(program) -> str:
    forward = program.graphs["forward"].output_map
    evaluate = program.graphs.get("evaluate")
    loss = evaluate.output_map["loss"].type if evaluate is not None else None
    return param_table(program.name, program.train_inputs,
                       {k: forward[k].type for k in program.outputs}, loss,
                       program.param_info.values())
