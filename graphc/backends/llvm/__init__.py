"""The llvm backend: fused kernels rendered as LLVM IR, compiled for this CPU with llvmlite
(imported on first use only), run through one native call per graph."""
