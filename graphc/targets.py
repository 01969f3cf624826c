"""The backends' names, devices and precisions, known without importing any backend (the CLI's
choices, the train block's `device`), and `backend_for`, which picks a program's backend. Core:
the compiler checks train blocks against these names and the runtime dispatches on them."""
from __future__ import annotations

BACKEND_NAMES = ("numpy", "llvm", "cuda")
DEVICES = ("cpu", "cuda")          # a train block's `device`
PRECISIONS = ("f32", "tf32")       # of matrix products; tf32 on the cuda backend only


def backend_for(train: dict | None, backend: str | None = None) -> str:
    """The backend a program runs on: `backend` where one is named (--backend), else the one its
    train block's `device` asks for: cuda for `cuda`; for `cpu`, the default, numpy (the
    reference; --backend llvm is the fast one)."""
    if backend is not None:
        return backend
    return "cuda" if (train or {}).get("device") == "cuda" else "numpy"
