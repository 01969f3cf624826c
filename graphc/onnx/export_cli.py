"""The `graphc export` command: a run, an artifact or a .nn file written as an ONNX model."""
from __future__ import annotations

from graphc.cli_types import at_least


def add_commands(sub) -> None:
    from graphc.onnx.export import DEFAULT_OPSET, GRAPHS
    p = sub.add_parser(
        "export", help="write a model as an ONNX file (inference graph or whole train step)",
        description="Write a model as an ONNX model of standard ops: by default the inference "
                    "graph, the input preprocessing of a run included, parameters as "
                    "initializers; with --graph train-step the whole training step (forward, "
                    "backward, optimizer update). A run exports its trained parameters. Needs "
                    "the onnx package: pip install -e '.[onnx]'. See docs/onnx.md.")
    p.add_argument("target", metavar="RUN|ARTIFACT|FILE.nn")
    p.add_argument("-o", "--out", metavar="MODEL.onnx", required=True, help="the ONNX file to write")
    p.add_argument("--opset", type=at_least(1), default=DEFAULT_OPSET,
                   help=f"the ONNX opset (default {DEFAULT_OPSET}; 20 or newer exports gelu as Gelu)")
    p.add_argument("--graph", choices=GRAPHS, default="forward",
                   help="forward (inference, default) or train-step")
    p.add_argument("--model", metavar="NAME", help="which model, when the .nn file holds several")
    p.add_argument("--seed", type=int, help="seed of a .nn file's parameters (default: the train "
                                            "block's, else 0)")
    p.set_defaults(run=cmd_export)


def cmd_export(args) -> int:
    from graphc.onnx.export import export_onnx, summary
    proto = export_onnx(args.target, args.out, opset=args.opset, graph=args.graph,
                        model=args.model, seed=args.seed)
    meta = {p.key: p.value for p in proto.metadata_props}
    print(f"exported {meta['graphc.model']} ({args.graph}, opset {args.opset}) -> {args.out}: "
          f"{summary(proto)}")
    return 0
