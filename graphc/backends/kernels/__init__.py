"""Kernel planning: fusion of a lowered graph into kernels, and the buffers they run on. Compiled
backends (llvm, cuda) render the same plan; the numpy backend runs graphs node by node."""
from graphc.backends.kernels.fuse import plan_kernels
from graphc.backends.kernels.ir import Kernel, KernelPlan

__all__ = ["plan_kernels", "Kernel", "KernelPlan"]
