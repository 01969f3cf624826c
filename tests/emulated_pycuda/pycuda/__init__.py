"""An emulated pycuda for graphc's tests on machines without a GPU: the part of pycuda's API that
graphc/backends/cuda/executor.py calls, on host memory, with the generated kernels run on the CPU by
tests/cuda_emulator.py. `tests/emulated_pycuda` on sys.path (or PYTHONPATH) puts it in place of
the real one; tests/emulated_device.py does that for a test. See driver.py for what it checks."""
VERSION = (0, 0)
VERSION_TEXT = "emulated"
