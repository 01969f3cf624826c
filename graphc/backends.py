"""The backends' names, known without importing any of them (the CLI's choices)."""
BACKEND_NAMES = ("numpy", "llvm", "cuda")
