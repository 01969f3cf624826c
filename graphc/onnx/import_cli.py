"""`graphc import MODEL.onnx -o DIR`: an ONNX model as DIR/NAME.nn and DIR/NAME.npz
(`graphc.compile_onnx` in api.py compiles what `import_file` makes)."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from graphc.errors import error
from graphc.files import atomic_write
from graphc.onnx.importer import LOSSES, Imported, import_model, model_name
from graphc.onnx.load import load_onnx


def import_file(path, loss: str = "none", data: str = "npz(\"data.npz\")",
                name: str | None = None) -> Imported:
    """The .nn text and the parameter arrays of the ONNX file `path`."""
    model = load_onnx(path)
    return import_model(model, name or model_name(path), str(path), loss, data)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_imported(imported: Imported, out_dir) -> Path:
    """DIR/NAME.nn and DIR/NAME.npz (the folder made if missing; nothing written elsewhere)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise error("not a folder", file=out)
    out.mkdir(parents=True, exist_ok=True)
    nn = out / f"{imported.name}.nn"
    atomic_write(out / imported.npz_name, npz_bytes(imported.arrays))
    atomic_write(nn, imported.source.encode("utf-8"))
    return nn


def add_commands(sub) -> None:
    p = sub.add_parser("import", help="read an ONNX model as a .nn file and its parameters",
                       description="Write DIR/NAME.nn, a readable model whose parameters are read "
                                   "from DIR/NAME.npz (the npz initializer), and that .npz. With "
                                   "--loss, a label input, the loss and a train block skeleton.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("-o", "--out", metavar="DIR", required=True, help="the folder to write into")
    p.add_argument("--loss", choices=LOSSES, default="none",
                   help="add a loss on the first output and a train block (default: none)")
    p.add_argument("--name", help="the model's name (default: the file's, as an identifier)")
    p.add_argument("--data", default=None,
                   help="the train block's data set, as written there (default: npz(\"data.npz\"))")
    p.set_defaults(run=cmd_import)


def cmd_import(args) -> int:
    from graphc.files import is_identifier
    if args.data is not None and not re.fullmatch(r"[A-Za-z_]\w*(\([^(){}\n;]*\))?", args.data):
        raise error(f"--data {args.data!r} is not a data set as a train block writes it "
                    f"(mnist, npz(\"train.npz\"), ...)")
    if args.name is not None and not is_identifier(args.name):
        raise error(f"--name {args.name!r} is not an identifier ([A-Za-z_][A-Za-z0-9_]*)")
    imported = import_file(args.model, args.loss, args.data or "npz(\"data.npz\")", args.name)
    nn = write_imported(imported, args.out)
    size = sum(a.size for a in imported.arrays.values())
    print(f"wrote {nn} ({len(imported.source.splitlines())} lines) and "
          f"{os.path.join(args.out, imported.npz_name)} ({len(imported.arrays)} arrays, "
          f"{size:,} numbers)")
    return 0
