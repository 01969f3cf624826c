"""The cuda backend's tests run on a GPU where pycuda finds one, else on the emulated pycuda of
tests/emulated_pycuda (kernels on the CPU, queued work run as late as the host allows)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

EMULATED = str(Path(__file__).resolve().parent / "emulated_pycuda")


def gpu_problem() -> str | None:
    """Why the real pycuda cannot run here (None: it can)."""
    try:
        import pycuda.driver  # noqa: F401
    except ImportError as exc:
        return f"no pycuda ({exc})"
    from graphc.backends.cuda.executor import CudaUnavailable, _driver
    try:
        _driver()
    except CudaUnavailable as exc:
        return str(exc).splitlines()[0]
    return None


def _forget_pycuda() -> dict:
    gone = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "pycuda"}
    from graphc.backends.cuda import executor
    executor._driver.cache_clear()
    return gone


@contextlib.contextmanager
def emulated_pycuda():
    """`import pycuda` gives the emulated one inside the block (and the executor uses it)."""
    saved = _forget_pycuda()
    sys.path.insert(0, EMULATED)
    try:
        import pycuda.driver as drv
        yield drv
    finally:
        sys.path.remove(EMULATED)
        _forget_pycuda()
        sys.modules.update(saved)


def emulated_env() -> dict[str, str]:
    """The environment of a subprocess that runs graphc on the emulated device."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": EMULATED + (os.pathsep + path if path else "")}
