"""The CUDA backend: CUDA C rendered from the kernel plans, run through pycuda."""
