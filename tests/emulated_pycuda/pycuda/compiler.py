"""pycuda.compiler, emulated: `compile` returns the source itself, marked, as the "cubin" that
the emulated driver's module_from_buffer builds with g++ (tests/cuda_emulator.py)."""
from __future__ import annotations

MARK = b"graphc emulated cubin\n"


class CompileError(Exception):
    pass


def compile(source: str, nvcc: str = "nvcc", options=None, keep: bool = False,  # noqa: A001
            no_extern_c: bool = False, arch: str | None = None, code=None, cache_dir=None,
            include_dirs=()) -> bytes:
    if not no_extern_c:
        raise CompileError("graphc's kernels are declared extern \"C\" themselves")
    return MARK + source.encode()
