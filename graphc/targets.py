"""The backends' names, devices and precisions, known without importing any backend (the CLI's
choices, the train block's `device` and `backend`), and `backend_for`, which picks a program's
backend (`auto`: llvm where llvmlite loads, else numpy). Core:
the compiler checks train blocks against these names and the runtime dispatches on them."""
from __future__ import annotations

import logging

BACKEND_NAMES = ("numpy", "llvm", "cuda")
BACKEND_CHOICES = ("auto",) + BACKEND_NAMES     # what --backend and a train block's `backend` take
DEVICES = ("cpu", "cuda")          # a train block's `device`
PRECISIONS = ("f32", "tf32")       # of matrix products; tf32 on the cuda backend only


def backend_for(train: dict | None, backend: str | None = None) -> str:
    """The backend a program runs on: `backend` where one is named (--backend), else the one its
    train block's `backend` names, else the one its `device` asks for: cuda for `cuda`; for `cpu`,
    the default, `auto`. `auto` is llvm where llvmlite loads, numpy otherwise."""
    train = train or {}
    if backend is None:
        backend = train.get("backend", "auto")
    if backend == "auto" and train.get("device") == "cuda":
        backend = "cuda"
    return auto_backend() if backend == "auto" else backend


_fallback_said = False


def auto_backend() -> str:
    """llvm (fused native kernels) where llvmlite loads; numpy otherwise, which is said once."""
    global _fallback_said
    try:
        import llvmlite.binding  # noqa: F401
        return "llvm"
    except (ImportError, OSError) as err:
        if not _fallback_said:
            _fallback_said = True
            logging.getLogger("graphc").warning(
                "llvmlite does not load (%s): running on the numpy backend, several times slower "
                "on convolutions (pip install llvmlite; --backend numpy says so and is quiet)", err)
        return "numpy"
