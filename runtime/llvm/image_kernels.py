"""Native kernels for data augmentation (runtime/augment.py): resampling a batch of images through
one affine map per image, and adding noise read from a bank of normal numbers.

Augmentation runs a batch ahead of the compiled step, in a thread. In numpy, resampling costs a
dozen passes over the batch (gathers, blends, casts) and holds the GIL between them: for MNIST's
MLP that is twice the whole training step. Here each output pixel is computed once, in one call
that releases the GIL. The IR is written by hand (the kernel IR has strided accesses only, no
gathers) and compiled like every other module: for the host CPU, cached on disk.

The arithmetic is the numpy reference's (`augment.resample`): source coordinates in float32,
clipped to [-1, size], zero outside the image, nearest pixel by rint or bilinear blending as
top + (top_right - top) * fc, and so on. Only the coordinates' rounding may differ (numpy's
product is a BLAS call), by an ulp.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from graphc.runtime.augment import bordered
from graphc.runtime.llvm import jit

_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
DTYPES = tuple(_TYPES)            # the image types the kernels take

_RESAMPLE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
_NOISE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int64)


def _resample_ir(t: str, bilinear: bool) -> str:
    """out[i, k, r, c] = images[i, k] at maps[i] @ (r, c, 1), for a batch [n, channels, h, w] of
    element type `t`, read from `src`: the planes with a zero border, one pixel before and two
    after ([n * channels, h + 3, w + 3], `augment.bordered`), so that source pixels clipped into
    [-1, size] and their neighbours +1 need no bounds checks. Maps are [n, 6] float32 (the first
    two rows of each 3 x 3 matrix). Loops: every (image, channel) plane, its rows, its columns."""
    name = f"graphc_resample_{'bilinear' if bilinear else 'nearest'}_{t}"
    if bilinear:
        sample = f"""
  %r0f = call float @llvm.floor.f32(float %sr)
  %c0f = call float @llvm.floor.f32(float %sc)
  %r0 = fptosi float %r0f to i32
  %c0 = fptosi float %c0f to i32
  %r1 = add i32 %r0, 1
  %c1 = add i32 %c0, 1
  %frf = fsub float %sr, %r0f
  %fcf = fsub float %sc, %c0f
{_widen(t, "%fr", "%frf")}
{_widen(t, "%fc", "%fcf")}
{_pixel(t, "tl", "%r0", "%c0")}
{_pixel(t, "tr", "%r0", "%c1")}
{_pixel(t, "bl", "%r1", "%c0")}
{_pixel(t, "br", "%r1", "%c1")}
  %dt = fsub {t} %tr, %tl
  %mt = fmul {t} %dt, %fc
  %top = fadd {t} %tl, %mt
  %db = fsub {t} %br, %bl
  %mb = fmul {t} %db, %fc
  %bottom = fadd {t} %bl, %mb
  %dv = fsub {t} %bottom, %top
  %mv = fmul {t} %dv, %fr
  %value = fadd {t} %top, %mv"""
    else:
        sample = f"""
  %rn = call float @llvm.rint.f32(float %sr)
  %cn = call float @llvm.rint.f32(float %sc)
  %r0 = fptosi float %rn to i32
  %c0 = fptosi float %cn to i32
{_pixel(t, "value", "%r0", "%c0")}"""
    return f"""
define void @{name}(ptr noalias nocapture readonly %src, ptr noalias nocapture %dst,
                    ptr noalias nocapture readonly %maps, i64 %n, i64 %channels, i64 %h,
                    i64 %w) nounwind {{
entry:
  %planes = mul i64 %n, %channels
  %h32 = trunc i64 %h to i32
  %w32 = trunc i64 %w to i32
  %pitch = add i32 %w32, 3
  %pitch64 = sext i32 %pitch to i64
  %h3 = add i64 %h, 3
  %padded.size = mul i64 %h3, %pitch64
  %first = add i64 %pitch64, 1
  %hf = sitofp i32 %h32 to float
  %wf = sitofp i32 %w32 to float
  %empty = icmp eq i64 %planes, 0
  br i1 %empty, label %done, label %plane

plane:                                        ; one channel of one image
  %q = phi i64 [ 0, %entry ], [ %q.next, %plane.end ]
  %image = udiv i64 %q, %channels
  %m = mul i64 %image, 6
  %m0p = getelementptr float, ptr %maps, i64 %m
  %m1p = getelementptr float, ptr %m0p, i64 1
  %m2p = getelementptr float, ptr %m0p, i64 2
  %m3p = getelementptr float, ptr %m0p, i64 3
  %m4p = getelementptr float, ptr %m0p, i64 4
  %m5p = getelementptr float, ptr %m0p, i64 5
  %m0 = load float, ptr %m0p
  %m1 = load float, ptr %m1p
  %m2 = load float, ptr %m2p
  %m3 = load float, ptr %m3p
  %m4 = load float, ptr %m4p
  %m5 = load float, ptr %m5p
  %size = mul i64 %h, %w
  %base = mul i64 %q, %size
  %padded.base = mul i64 %q, %padded.size
  %corner = getelementptr {t}, ptr %src, i64 %padded.base
  %in = getelementptr {t}, ptr %corner, i64 %first          ; pixel (0, 0)
  %out = getelementptr {t}, ptr %dst, i64 %base
  br label %row

row:
  %r = phi i32 [ 0, %plane ], [ %r.next, %row.end ]
  %rf = sitofp i32 %r to float
  %ar = fmul float %m0, %rf
  %br0 = fadd float %ar, %m2
  %cr = fmul float %m3, %rf
  %dr0 = fadd float %cr, %m5
  %orow = mul i32 %r, %w32
  br label %col

col:
  %c = phi i32 [ 0, %row ], [ %c.next, %col ]
  %cf = sitofp i32 %c to float
  %sr.c = fmul float %m1, %cf
  %sr.raw = fadd float %br0, %sr.c
  %sc.c = fmul float %m4, %cf
  %sc.raw = fadd float %dr0, %sc.c
  %sr.lo = call float @llvm.maxnum.f32(float %sr.raw, float -1.0)
  %sr = call float @llvm.minnum.f32(float %sr.lo, float %hf)
  %sc.lo = call float @llvm.maxnum.f32(float %sc.raw, float -1.0)
  %sc = call float @llvm.minnum.f32(float %sc.lo, float %wf)
{sample}
  %o = add i32 %orow, %c
  %op = getelementptr {t}, ptr %out, i32 %o
  store {t} %value, ptr %op
  %c.next = add i32 %c, 1
  %c.more = icmp ult i32 %c.next, %w32
  br i1 %c.more, label %col, label %row.end

row.end:
  %r.next = add i32 %r, 1
  %r.more = icmp ult i32 %r.next, %h32
  br i1 %r.more, label %row, label %plane.end

plane.end:
  %q.next = add i64 %q, 1
  %q.more = icmp ult i64 %q.next, %planes
  br i1 %q.more, label %plane, label %done

done:
  ret void
}}
"""


def _pixel(t: str, name: str, row: str, col: str) -> str:
    """%name = the pixel (row, col), row and col in [-1, size + 1], of the padded plane whose
    pixel (0, 0) is at %in: the border reads zero."""
    return f"""  %{name}.rw = mul i32 {row}, %pitch
  %{name}.at = add i32 %{name}.rw, {col}
  %{name}.p = getelementptr {t}, ptr %in, i32 %{name}.at
  %{name} = load {t}, ptr %{name}.p"""


def _widen(t: str, name: str, value: str) -> str:
    """%name = float `value` as `t` (the numpy reference casts the fractions to the images' type)."""
    cast = "bitcast" if t == "float" else "fpext"      # a bitcast to the same type is a copy
    return f"  {name} = {cast} float {value} to {t}"


def _noise_ir(t: str) -> str:
    """y[i, p] = x[i, p] + std * normals[offsets[i] + p] for n images of `size` elements (the
    product in float32, as the numpy reference computes it, then cast to `t`)."""
    return f"""
define void @graphc_add_noise_{t}(ptr noalias nocapture readonly %x, ptr noalias nocapture %y,
                                  ptr noalias nocapture readonly %normals,
                                  ptr noalias nocapture readonly %offsets, float %std, i64 %n,
                                  i64 %size) nounwind {{
entry:
  %empty = icmp eq i64 %n, 0
  %none = icmp eq i64 %size, 0
  %skip = or i1 %empty, %none
  br i1 %skip, label %done, label %image

image:
  %i = phi i64 [ 0, %entry ], [ %i.next, %image.end ]
  %offp = getelementptr i64, ptr %offsets, i64 %i
  %off = load i64, ptr %offp
  %bank = getelementptr float, ptr %normals, i64 %off
  %base = mul i64 %i, %size
  %row = getelementptr {t}, ptr %x, i64 %base
  %out = getelementptr {t}, ptr %y, i64 %base
  br label %pixel

pixel:
  %p = phi i64 [ 0, %image ], [ %p.next, %pixel ]
  %zp = getelementptr float, ptr %bank, i64 %p
  %z = load float, ptr %zp
  %s = fmul float %std, %z
{_widen(t, "%sw", "%s")}
  %xp = getelementptr {t}, ptr %row, i64 %p
  %xv = load {t}, ptr %xp
  %yv = fadd {t} %xv, %sw
  %yp = getelementptr {t}, ptr %out, i64 %p
  store {t} %yv, ptr %yp
  %p.next = add i64 %p, 1
  %p.more = icmp ult i64 %p.next, %size
  br i1 %p.more, label %pixel, label %image.end

image.end:
  %i.next = add i64 %i, 1
  %i.more = icmp ult i64 %i.next, %n
  br i1 %i.more, label %image, label %done

done:
  ret void
}}
"""


_DECLARATIONS = """
declare float @llvm.floor.f32(float)
declare float @llvm.rint.f32(float)
declare float @llvm.maxnum.f32(float, float)
declare float @llvm.minnum.f32(float, float)
"""


def module_text() -> str:
    """The whole module: resampling (nearest and bilinear) and noise, for float and double."""
    parts = [_DECLARATIONS]
    for t in _TYPES.values():
        parts += [_resample_ir(t, False), _resample_ir(t, True), _noise_ir(t)]
    return "".join(parts)


@functools.cache
def _function(name: str, prototype):
    """The compiled function `name` (the whole module is compiled, or read from the cache, on
    the first call)."""
    return prototype(_compiled().address(name))


@functools.cache
def _compiled() -> jit.Compiled:
    text = module_text()
    return jit.Compiled(jit.object_code(text, lambda: text))


def resample(images: np.ndarray, maps: np.ndarray, exact: bool) -> np.ndarray:
    """augment.resample, natively: images [n, C, H, W] (float32 or float64), maps [n, 3, 3]."""
    n, channels, height, width = images.shape
    assert (height + 3) * (width + 3) < 2**31, "pixels of a plane are indexed with 32-bit integers"
    rows = np.ascontiguousarray(maps[:, :2].reshape(n, 6), dtype=np.float32)
    out = np.empty(images.shape, images.dtype)     # row-major, as the kernel writes it
    kind = "nearest" if exact else "bilinear"
    fn = _function(f"graphc_resample_{kind}_{_TYPES[images.dtype]}", _RESAMPLE)
    padded = bordered(images)       # held here: the kernel reads it through a bare address
    fn(padded.ctypes.data, out.ctypes.data, rows.ctypes.data, n, channels, height, width)
    return out


def add_noise(x: np.ndarray, normals: np.ndarray, offsets: np.ndarray, std: float) -> np.ndarray:
    """x + std * normals[offsets[i]:offsets[i] + size] for each image i of x (a new array)."""
    x = np.ascontiguousarray(x)
    n, size = len(x), x[0].size if len(x) else 0
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    assert normals.dtype == np.float32 and normals.flags.c_contiguous
    assert not n or (offsets.min() >= 0 and offsets.max() <= len(normals) - size)
    out = np.empty_like(x)
    fn = _function(f"graphc_add_noise_{_TYPES[x.dtype]}", _NOISE)
    fn(x.ctypes.data, out.ctypes.data, normals.ctypes.data, offsets.ctypes.data, std, n, size)
    return out
