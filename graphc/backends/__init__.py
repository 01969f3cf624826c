"""The backends' names, known without importing any of them (the CLI's choices)."""
BACKEND_NAMES = ("numpy", "llvm", "cuda")
PRECISIONS = ("f32", "tf32")       # of matrix products; tf32 on the cuda backend only


def backend_for(train: dict | None, backend: str | None = None) -> str:
    """The backend a program runs on: `backend` where one is named (--backend), else the one its
    train block's `device` asks for: cuda for `cuda`; for `cpu`, the default, numpy (the
    reference; --backend llvm is the fast one)."""
    if backend is not None:
        return backend
    return "cuda" if (train or {}).get("device") == "cuda" else "numpy"
