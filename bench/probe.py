"""What workload (e) times in a fresh process: `python -m bench.probe MODE PATH BACKEND` imports
graphc and compiles PATH, then either makes the first calls (`build`: one forward pass and, with a
train block, one train step, on zeros: backends that compile kernels on first use do it there) or
takes one train step on a batch of 64 (`first_step`), and prints one JSON line of seconds.
Nothing but the standard library is imported before the clock starts."""
import time

T0 = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402


def _zeros(types: dict, batch: int) -> dict:
    import numpy as np

    return {name: np.zeros([batch if isinstance(d, str) else d for d in t.shape], dtype=t.dtype.numpy)
            for name, t in types.items()}


def _first_calls(program) -> None:
    program.forward(**_zeros(program.inputs, 8))
    if "train_step" in program.graphs:
        program.train_step(**_zeros(program.train_inputs, 8))


def _first_step(program) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    (name, ttype), = program.inputs.items()
    x = rng.random((64, *ttype.shape[1:]), dtype=np.float32)
    program.train_step(**{name: x, "y": rng.integers(0, 10, 64)})


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def main() -> None:
    mode, path, backend = sys.argv[1:4]
    import graphc

    t_import = time.perf_counter()
    try:
        program = graphc.compile_file(path, backend=backend)
    except Exception as exc:   # reported, not raised: a backend may be missing or broken
        print(json.dumps({"error": _error(exc)}))
        return
    t_build = time.perf_counter()
    try:
        (_first_step if mode == "first_step" else _first_calls)(program)
    except Exception as exc:
        print(json.dumps({"error": f"first call: {_error(exc)}"}))
        return
    t_end = time.perf_counter()
    print(json.dumps({"import_s": t_import - T0, "build_s": t_build - t_import,
                      "first_s": t_end - t_build, "total_s": t_end - T0}))


if __name__ == "__main__":
    main()
