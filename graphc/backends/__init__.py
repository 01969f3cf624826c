"""The backends layer: kernel and memory planning shared by the compiled backends (kernels/), and
the numpy, llvm and cuda backends. Their names, known without importing any of them, are in
graphc/targets.py (core)."""
