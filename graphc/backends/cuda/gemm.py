"""The tiled GEMM of the CUDA renderer: C[m, n] = sum_k A[m, k] B[k, n] for operands of any
strides (transposes are strides), a BM x BN tile of C per block, BK-deep slices of K staged in
shared memory, each thread a 4 x 4 block of C in registers; then, per element of that block,
whatever the caller renders there (the plain store, or a fused epilogue).

Tile loads move four consecutive elements along the operand's contiguous axis per thread: one
16-byte load (float4) when the operand is f32, that axis has stride 1, the other stride is a
multiple of 4 and the base is 16-byte aligned (checked at run time, once per block), four guarded
scalar loads otherwise (odd sizes, the edges of the matrix, f64). With `precision="tf32"` the
products run on the tensor cores (wmma, m16n16k8, inputs rounded to TF32, sums in f32).
"""
from __future__ import annotations

from collections.abc import Callable

from graphc.backends.kernels.ir import ONE

BM, BN, BK, THREADS = 64, 64, 16, 256
PAD = 4                 # keeps shared rows 16-byte aligned and spreads the transposed stores over banks
assert BM * BK == BN * BK == 4 * THREADS, "each thread loads one group of four of each tile"


def _operand(name: str, tile: str, row: str, extent: str, s_row: str, s_k: str, fast: str,
             ctype: str, vector: bool) -> list[str]:
    """Loads one BK x B tile of operand `name` into shared `tile`[k][row]: each thread a group
    of four along the operand's `fast` axis ("k" or "row")."""
    groups = BK // 4 if fast == "k" else BM // 4
    if fast == "k":
        head = [f"const int r = threadIdx.x / {groups}, kq = threadIdx.x % {groups};",
                f"const i64 gr = {row} + r, gk = k0 + 4 * kq;"]
        inside, at = f"gr < {extent} && gk + 3 < K", f"gr * {s_row} + gk"
        scalar = f"(gr < {extent} && gk + c < K) ? {name}[gr * {s_row} + (gk + c) * {s_k}] : 0"
        put = [f"for (int c = 0; c < 4; ++c) {tile}[4 * kq + c][r] = v[c];"]
    else:
        head = [f"const int kk = threadIdx.x / {groups}, rq = threadIdx.x % {groups};",
                f"const i64 gk = k0 + kk, gr = {row} + 4 * rq;"]
        inside, at = f"gk < K && gr + 3 < {extent}", f"gk * {s_k} + gr"
        scalar = f"(gk < K && gr + c < {extent}) ? {name}[gk * {s_k} + (gr + c) * {s_row}] : 0"
        put = [f"for (int c = 0; c < 4; ++c) {tile}[kk][4 * rq + c] = v[c];"]
    lines = ["{", *("    " + h for h in head), f"    {ctype} v[4];"]
    guard = "    "
    if vector:
        lines += [f"    if (vec_{name} && {inside}) {{",
                  f"        const float4 w = *reinterpret_cast<const float4*>({name} + {at});",
                  "        v[0] = w.x; v[1] = w.y; v[2] = w.z; v[3] = w.w;",
                  "    } else {"]
        guard = "        "
    lines += [f"{guard}#pragma unroll", f"{guard}for (int c = 0; c < 4; ++c) v[c] = {scalar};"]
    if vector:
        lines.append("    }")
    lines += ["    #pragma unroll", *("    " + p for p in put), "}"]
    return lines


def _fast(access, k_axis: int) -> str:
    """The axis along which a thread's four loaded elements lie: the contiguous one."""
    if access.strides[k_axis] == ONE:
        return "k"
    return "row"


def render(a, b, out, sizes: tuple[str, str, str], strides: dict[str, str], pointers: dict[str, str],
           ctype: str, precision: str, point: Callable[[str, str, str], list[str]] | None) -> list[str]:
    """The GEMM's body. `a`, `b`, `out`: the accesses (for which axis is contiguous); `sizes`: C
    expressions of M, K, N; `strides`: of sam, sak, sbk, sbn, scm, scn; `pointers`: A, B, C.
    `point(value, gm, gn)` renders what happens at one element of C (in bounds), a fused
    epilogue; without it each element is stored to C, four at once where C allows."""
    f32 = ctype == "float"
    tensor = precision == "tf32" and f32
    m, k, n = sizes
    fast_a, fast_b = _fast(a, 1), _fast(b, 1)
    lines = [
        f"const i64 M = {m}, K = {k}, N = {n};",
        f"__shared__ __align__(32) {ctype} As[{BK}][{BM} + {PAD}];",
        f"__shared__ __align__(32) {ctype} Bs[{BK}][{BN} + {PAD}];",
        f"const {ctype}* A = {pointers['A']};",
        f"const {ctype}* B = {pointers['B']};",
        *(f"const i64 {s} = {strides[s]};" for s in ("sam", "sak", "sbk", "sbn")),
        f"const i64 m0 = (i64)blockIdx.y * {BM}, n0 = (i64)blockIdx.x * {BN};",
        "const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;",
    ]
    if f32:
        lines += [_aligned("A", "sak" if fast_a == "k" else "sam", "sam" if fast_a == "k" else "sak"),
                  _aligned("B", "sbk" if fast_b == "k" else "sbn", "sbn" if fast_b == "k" else "sbk")]
    tiles = (_operand("A", "As", "m0", "M", "sam", "sak", fast_a, ctype, f32)
             + _operand("B", "Bs", "n0", "N", "sbn", "sbk", fast_b, ctype, f32))
    lines += _tensor_core_loop(tiles) if tensor else _fma_loop(tiles, ctype, f32)
    if point is None:
        vector = f32 and out.strides[2] == ONE
        lines += [f"{ctype}* C = {pointers['C']};",
                  *(f"const i64 {s} = {strides[s]};" for s in ("scm", "scn"))]
        if vector:
            lines.append(_aligned("C", "scn", "scm"))
        lines += _epilogue(ctype, lambda v, gm, gn: [f"C[{gm} * scm + {gn} * scn] = {v};"], vector)
    else:
        lines += _epilogue(ctype, point, False)
    return lines


def _aligned(name: str, unit: str, other: str) -> str:
    """Whether `name`'s groups of four are 16-byte loads: contiguous, each group aligned."""
    return (f"const bool vec_{name} = {unit} == 1 && {other} % 4 == 0 && "
            f"((unsigned long long){name} & 15) == 0;")


def _fma_loop(tiles: list[str], ctype: str, f32: bool) -> list[str]:
    if f32:     # 16-byte shared loads of the thread's four rows and four columns
        fetch = ["const float4 av = *reinterpret_cast<const float4*>(&As[kk][4 * ty]);",
                 "const float4 bv = *reinterpret_cast<const float4*>(&Bs[kk][4 * tx]);",
                 "const float a[4] = {av.x, av.y, av.z, av.w}, b[4] = {bv.x, bv.y, bv.z, bv.w};"]
    else:
        fetch = [f"{ctype} a[4], b[4];",
                 "#pragma unroll",
                 "for (int i = 0; i < 4; ++i) { a[i] = As[kk][4 * ty + i]; b[i] = Bs[kk][4 * tx + i]; }"]
    return [
        f"{ctype} acc[4][4];",
        "#pragma unroll",
        "for (int i = 0; i < 4; ++i)",
        "    #pragma unroll",
        "    for (int j = 0; j < 4; ++j) acc[i][j] = 0;",
        f"for (i64 k0 = 0; k0 < K; k0 += {BK}) {{",
        *("    " + t for t in tiles),
        "    __syncthreads();",
        "    #pragma unroll",
        f"    for (int kk = 0; kk < {BK}; ++kk) {{",
        *("        " + f for f in fetch),
        "        #pragma unroll",
        "        for (int i = 0; i < 4; ++i)",
        "            #pragma unroll",
        "            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];",
        "    }",
        "    __syncthreads();",
        "}",
    ]


def _tensor_core_loop(tiles: list[str]) -> list[str]:
    """Eight warps, each a 16 x 32 piece of the tile (two 16 x 16 accumulators); As holds A
    column-major (As[k][m]), Bs holds B row-major (Bs[k][n]). The result goes through shared
    memory into the same 4 x 4 per-thread layout as the FMA loop, for the same epilogue."""
    w = "nvcuda::wmma"
    ld = BM + PAD
    return [
        "const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;",
        f"{w}::fragment<{w}::accumulator, 16, 16, 8, float> cf[2];",
        f"{w}::fill_fragment(cf[0], 0.0f);",
        f"{w}::fill_fragment(cf[1], 0.0f);",
        f"for (i64 k0 = 0; k0 < K; k0 += {BK}) {{",
        *("    " + t for t in tiles),
        "    __syncthreads();",
        "    #pragma unroll",
        f"    for (int ks = 0; ks < {BK}; ks += 8) {{",
        f"        {w}::fragment<{w}::matrix_a, 16, 16, 8, {w}::precision::tf32, {w}::col_major> af;",
        f"        {w}::load_matrix_sync(af, &As[ks][16 * wm], {ld});",
        "        #pragma unroll",
        f"        for (int t = 0; t < af.num_elements; ++t) af.x[t] = {w}::__float_to_tf32(af.x[t]);",
        "        #pragma unroll",
        "        for (int f = 0; f < 2; ++f) {",
        f"            {w}::fragment<{w}::matrix_b, 16, 16, 8, {w}::precision::tf32, {w}::row_major> bf;",
        f"            {w}::load_matrix_sync(bf, &Bs[ks][32 * wn + 16 * f], {ld});",
        "            #pragma unroll",
        f"            for (int t = 0; t < bf.num_elements; ++t) bf.x[t] = {w}::__float_to_tf32(bf.x[t]);",
        f"            {w}::mma_sync(cf[f], af, bf, cf[f]);",
        "        }",
        "    }",
        "    __syncthreads();",
        "}",
        f"__shared__ __align__(32) float Cs[{BM}][{BN} + {PAD}];",
        f"{w}::store_matrix_sync(&Cs[16 * wm][32 * wn], cf[0], {ld}, {w}::mem_row_major);",
        f"{w}::store_matrix_sync(&Cs[16 * wm][32 * wn + 16], cf[1], {ld}, {w}::mem_row_major);",
        "__syncthreads();",
        "float acc[4][4];",
        "#pragma unroll",
        "for (int i = 0; i < 4; ++i)",
        "    #pragma unroll",
        "    for (int j = 0; j < 4; ++j) acc[i][j] = Cs[4 * ty + i][4 * tx + j];",
    ]


def _epilogue(ctype: str, point: Callable[[str, str, str], list[str]], vector_store: bool) -> list[str]:
    """Each row of the thread's 4 x 4 block in turn, not unrolled: unrolled, ptxas hoists every
    element's epilogue loads above the others' work and spills (seen with a ReLU mask, K = 10)."""
    lines = ["#pragma unroll 1",
             "for (int i = 0; i < 4; ++i) {",
             "    const i64 gm = m0 + 4 * ty + i;",
             "    if (gm >= M) continue;",
             f"    {ctype} row[4];",
             "    #pragma unroll",
             "    for (int j = 0; j < 4; ++j)",
             "        row[j] = i == 0 ? acc[0][j] : i == 1 ? acc[1][j] : i == 2 ? acc[2][j] : acc[3][j];"]
    if vector_store:        # the plain store of a contiguous f32 C: four elements at once
        lines += ["    if (vec_C && n0 + 4 * tx + 3 < N) {",
                  "        *reinterpret_cast<float4*>(C + gm * scm + n0 + 4 * tx) = "
                  "make_float4(row[0], row[1], row[2], row[3]);",
                  "        continue;",
                  "    }"]
    lines += ["    #pragma unroll",
              "    for (int j = 0; j < 4; ++j) {",
              "        const i64 gn = n0 + 4 * tx + j;",
              "        if (gn >= N) continue;",
              *("        " + p for p in point("row[j]", "gm", "gn")),
              "    }",
              "}"]
    return lines
