"""CUDA kernels for the CuPy path (lattice, projection, spatial tiles), chosen automatically.

:func:`kernels` returns a :class:`KernelSet` for CuPy arrays (``cupy.RawModule``, compiled by NVRTC
on first use, one module per dtype and compile-time size) unless ``CRFGRAD_NO_RAWKERNEL`` is set;
the callers then skip their vectorised array code, which stays the reference (and the path with
the variable set).  CuPy is imported only when a CuPy array arrives, never at package import.

Every kernel is a grid-stride loop over independent outputs (one thread = one output element or
one small block of them), with no shared memory, no synchronisation and no atomics, so each
result is summed in a fixed order (deterministic).  That also makes the same source valid C++:
with ``CRFGRAD_EMULATE_RAWKERNEL=1`` and NumPy arrays, :func:`kernels` compiles it with the host
C++ compiler (one "thread" walks the whole loop) and calls it through ctypes — how the test-suite
checks the kernels' logic, and the lattice/spatial/projection code around them, on a machine
without a GPU.

Layouts (row-major; ``REAL`` float or double, ``i32`` int32):

* ``lattice_blur``    lat (M, C), nbr (M, F) i32 (value M = missing vertex), w (F, C, nob·OB)
                      (zero-padded columns), order (M,) i32 -> out (M, O):
                      Y[v, o] = Σ_f Σ_c w[f, c, o] Z[nbr[v, f], c]; thread block i works on vertex
                      order[i] (vertices sorted by which taps they have, so that the threads of a
                      warp skip the same missing taps: for natural images only ~1/5 of the taps
                      exist, but nearly every warp of consecutive vertices has nearly all)
* ``lattice_tap_masks`` nbr -> mask (M,) uint64: bit f-1 set when tap f (1..64) exists
* ``lattice_taps_grad`` lat (M, C), grad (M, O), nbr -> partial (K, F, C, O): the sums
                      Σ_v Z[nbr[v, f], c] G[v, o] over the K chunks of ``chunk`` vertices (the
                      caller adds the chunks up; the threads of a warp share v and f)
* ``lattice_blur_scalar`` lat (M, C), nbr, g (F,) -> out (M, C): Σ_f g[f] Z[nbr[v, f], c]
* ``lattice_slice``   lat (M, C), vertex (n, d+1) i32, weight (n, d+1), scale (n,) -> out (n, C):
                      y[k, c] = scale[k] Σ_r weight[k, r] Y[vertex[k, r], c]
* ``lattice_splat``   x (n, C), scale (n,), CSR of the splat matrix (indptr (M+1,), point (nnz,),
                      weight (nnz,)) -> out (M, C): Z[v, c] = Σ_j weight[j] scale[p_j] x[p_j, c]
* ``lattice_points``  feat (d, n), scale (d,) -> rem0, rank (d+1, n) int64, bary (d+1, n): per point
                      Caffe's elevation, rounding, ranks and barycentric weights (as the array
                      code's _elevate_and_simplex, op for op: built without FMA contraction, FMAD=0)
* ``lattice_tap_table`` imm (d+1, M+1) i32, parent (F,), direction (F,) -> nbr (M, F): Caffe's walk,
                      tap f = tap parent[f] then one step along direction[f] (missing stays missing)
* ``lattice_invert_taps`` nbr (M, F) -> inv (M, F) (pre-filled with M): inv[nbr[v, f], f] = v
* ``simplex_project`` s (A, L, B) -> out (A, L, B), tau (A, B), rho (A, B) i32 (Caffe's rule)
* ``simplex_vjp``     g, s (A, L, B), tau, rho (A, B) -> out (A, L, B)
* ``tile_windows``    a (N, C, H, W) -> out (C, N, ny, nx, Ph, Pw): window (i, j) from image row
                      i·th - p, column j·tw - p (zero outside the image)
* ``tile_cores``      a (N, C, H, W) -> out (C, N, ny, nx, th, tw)
* ``tile_assemble``   t (O, N, ny, nx, Rh, Rw) -> out (N, O, H, W)
* ``freq_mix``        x (C, T, NF) complex, K (O, C, NF) complex -> y (O, T, NF):
                      y[o, t, f] = Σ_c K[o, c, f] x[c, t, f] (complex as interleaved re, im pairs)
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import numpy as np

__all__ = ['kernels', 'KernelSet', 'SOURCE', 'blur_block', 'MAX_MIX_CHANNELS', 'MAX_PROJECT_LABELS']

# outputs per thread of the blur kernel (register accumulators); more outputs -> several blocks
_MAX_BLUR_BLOCK = 32
# the frequency mixing keeps one pixel's C input values in registers; more channels: array code
MAX_MIX_CHANNELS = 64
# the projection sorts a pixel's L values in a thread-local array; more labels: array code
MAX_PROJECT_LABELS = 256
_THREADS = 256
_MAX_BLOCKS = 1 << 20

SOURCE = r'''
#ifndef REAL
#define REAL float
#endif
#ifndef OB
#define OB 1
#endif
#ifndef CIN
#define CIN 1
#endif
#ifndef LMAX
#define LMAX 1
#endif
#ifndef DMAX
#define DMAX 1
#endif
typedef long long i64;
#define GRID_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n); i += (i64)blockDim.x * gridDim.x)

extern "C" __global__ void lattice_blur(const REAL* __restrict__ lat, const int* __restrict__ nbr,
                                        const REAL* __restrict__ w, REAL* __restrict__ out,
                                        const int* __restrict__ order, int M, int C, int O, int F, int nob)
{
    const int opad = nob * OB;
    GRID_LOOP(i, (i64)M * nob) {
        const int v = order[i / nob];
        const int ob = (int)(i % nob);
        REAL acc[OB];
        for (int j = 0; j < OB; ++j) acc[j] = (REAL)0;
        const int* nb = nbr + (i64)v * F;
        for (int f = 0; f < F; ++f) {
            const int u = nb[f];
            if (u >= M) continue;
            const REAL* z = lat + (i64)u * C;
            const REAL* wf = w + (i64)f * C * opad + (i64)ob * OB;
            for (int c = 0; c < C; ++c) {
                const REAL x = z[c];
                const REAL* wc = wf + (i64)c * opad;
#pragma unroll
                for (int j = 0; j < OB; ++j) acc[j] += wc[j] * x;
            }
        }
        REAL* dst = out + (i64)v * O + (i64)ob * OB;
        for (int j = 0; j < OB; ++j)
            if (ob * OB + j < O) dst[j] = acc[j];
    }
}

extern "C" __global__ void lattice_taps_grad(const REAL* __restrict__ lat, const REAL* __restrict__ grad,
                                             const int* __restrict__ nbr, REAL* __restrict__ partial,
                                             int M, int C, int O, int F, int nob, int chunk)
{
    const int nchunks = (M + chunk - 1) / chunk;
    GRID_LOOP(i, (i64)nchunks * F * C * nob) {
        i64 r = i;
        const int ob = (int)(r % nob); r /= nob;
        const int c = (int)(r % C); r /= C;
        const int f = (int)(r % F);
        const int k = (int)(r / F);
        REAL acc[OB];
        for (int j = 0; j < OB; ++j) acc[j] = (REAL)0;
        const int v1 = (k + 1) * chunk < M ? (k + 1) * chunk : M;
        for (int v = k * chunk; v < v1; ++v) {
            const int u = nbr[(i64)v * F + f];
            if (u >= M) continue;
            const REAL x = lat[(i64)u * C + c];
            const REAL* g = grad + (i64)v * O + (i64)ob * OB;
#pragma unroll
            for (int j = 0; j < OB; ++j)
                if (ob * OB + j < O) acc[j] += x * g[j];
        }
        REAL* dst = partial + (((i64)k * F + f) * C + c) * O + (i64)ob * OB;
        for (int j = 0; j < OB; ++j)
            if (ob * OB + j < O) dst[j] = acc[j];
    }
}

extern "C" __global__ void lattice_tap_masks(const int* __restrict__ nbr, unsigned long long* __restrict__ mask,
                                             int M, int F)
{
    GRID_LOOP(v, M) {
        unsigned long long m = 0;
        const int* nb = nbr + v * F;
        const int top = F < 65 ? F : 65;
        for (int f = 1; f < top; ++f)
            if (nb[f] < M) m |= 1ull << (f - 1);
        mask[v] = m;
    }
}

extern "C" __global__ void lattice_blur_scalar(const REAL* __restrict__ lat, const int* __restrict__ nbr,
                                               const REAL* __restrict__ g, REAL* __restrict__ out,
                                               int M, int C, int F)
{
    GRID_LOOP(i, (i64)M * C) {
        const i64 v = i / C;
        const int c = (int)(i % C);
        const int* nb = nbr + v * F;
        REAL acc = (REAL)0;
        for (int f = 0; f < F; ++f) {
            const int u = nb[f];
            if (u < M) acc += g[f] * lat[(i64)u * C + c];
        }
        out[i] = acc;
    }
}

extern "C" __global__ void lattice_slice(const REAL* __restrict__ lat, const int* __restrict__ vertex,
                                         const REAL* __restrict__ weight, const REAL* __restrict__ scale,
                                         REAL* __restrict__ out, int n, int C, int D1, int has_scale)
{
    GRID_LOOP(i, (i64)n * C) {
        const i64 k = i / C;
        const int c = (int)(i % C);
        const int* vk = vertex + k * D1;
        const REAL* bk = weight + k * D1;
        REAL acc = (REAL)0;
        for (int r = 0; r < D1; ++r) acc += bk[r] * lat[(i64)vk[r] * C + c];
        if (has_scale) acc *= scale[k];
        out[i] = acc;
    }
}

extern "C" __global__ void lattice_splat(const REAL* __restrict__ x, const REAL* __restrict__ scale,
                                         const int* __restrict__ indptr, const int* __restrict__ point,
                                         const REAL* __restrict__ pw, REAL* __restrict__ out,
                                         int M, int C, int has_scale)
{
    GRID_LOOP(i, (i64)M * C) {
        const i64 v = i / C;
        const int c = (int)(i % C);
        REAL acc = (REAL)0;
        for (int j = indptr[v]; j < indptr[v + 1]; ++j) {
            const int p = point[j];
            REAL val = x[(i64)p * C + c];
            if (has_scale) val *= scale[p];
            acc += pw[j] * val;
        }
        out[i] = acc;
    }
}

extern "C" __global__ void lattice_points(const REAL* __restrict__ feat, const REAL* __restrict__ scale,
                                          long long* __restrict__ rem0, long long* __restrict__ rank,
                                          REAL* __restrict__ bary, int d, int n)
{
    /* compiled without FMA contraction: every product and sum rounded as the array code does */
    const int dp1 = d + 1;
    const float down32 = 1.0f / (float)dp1;
    GRID_LOOP(k, n) {
        REAL el[DMAX + 1], plus[DMAX + 2], minus[DMAX + 2];
        float res[DMAX + 1];
        long long r0[DMAX + 1];
        int rk[DMAX + 1];
        REAL sm = (REAL)0;
        for (int j = d; j > 0; --j) {
            const REAL cf = feat[(i64)(j - 1) * n + k] * scale[j - 1];
            el[j] = sm - (REAL)j * cf;
            sm = sm + cf;
        }
        el[0] = sm;
        long long total = 0;
        for (int i = 0; i < dp1; ++i) {
            const float e32 = (float)el[i];
            const double x = (double)(down32 * e32);
            const long long rd = (long long)trunc(x + (x < 0 ? -0.5 : 0.5));
            r0[i] = rd * dp1;
            total += rd;
            res[i] = e32 - (float)r0[i];
            rk[i] = 0;
        }
        for (int i = 0; i < d; ++i)
            for (int j = i + 1; j < dp1; ++j) {
                if (res[i] < res[j]) rk[i] += 1; else rk[j] += 1;
            }
        for (int i = 0; i < dp1; ++i) {
            long long r = rk[i] + total;
            if (r < 0) { r += dp1; r0[i] += dp1; }
            else if (r > d) { r -= dp1; r0[i] -= dp1; }
            rk[i] = (int)r;
            rem0[(i64)i * n + k] = r0[i];
            rank[(i64)i * n + k] = r;
        }
        for (int j = 0; j < dp1 + 1; ++j) { plus[j] = (REAL)0; minus[j] = (REAL)0; }
        for (int i = 0; i < dp1; ++i) {
            const REAL v = (el[i] - (REAL)r0[i]) * (REAL)down32;
            plus[d - rk[i]] = v;
            minus[d - rk[i] + 1] = v;
        }
        for (int j = 1; j < dp1; ++j) bary[(i64)j * n + k] = plus[j] - minus[j];
        const REAL last = plus[dp1] - minus[dp1];
        const REAL first = plus[0] - minus[0];
        bary[k] = (REAL)((double)first + (1.0 + (double)last));
    }
}

extern "C" __global__ void lattice_tap_table(const int* __restrict__ imm, const int* __restrict__ parent,
                                             const int* __restrict__ direction, int* __restrict__ nbr,
                                             int M, int F)
{
    GRID_LOOP(v, M) {
        int* nb = nbr + v * F;
        nb[0] = (int)v;
        for (int f = 1; f < F; ++f) nb[f] = imm[(i64)direction[f] * (M + 1) + nb[parent[f]]];
    }
}

extern "C" __global__ void lattice_invert_taps(const int* __restrict__ nbr, int* __restrict__ inv,
                                               int M, int F)
{
    GRID_LOOP(i, (i64)M * F) {
        const int u = nbr[i];
        if (u < M) inv[(i64)u * F + i % F] = (int)(i / F);
    }
}

extern "C" __global__ void simplex_project(const REAL* __restrict__ s, REAL* __restrict__ out,
                                           REAL* __restrict__ tau, int* __restrict__ rho,
                                           REAL leak, int A, int L, int B)
{
    GRID_LOOP(i, (i64)A * B) {
        const i64 base = (i / B) * (i64)L * B + i % B;
        REAL v[LMAX];
        for (int l = 0; l < L; ++l) {                      /* insertion sort, descending */
            const REAL x = s[base + (i64)l * B];
            int m = l;
            while (m > 0 && v[m - 1] < x) { v[m] = v[m - 1]; --m; }
            v[m] = x;
        }
        REAL csum = (REAL)0, t = (REAL)0;
        int stop = L;
        for (int r = 1; r <= L; ++r) {                     /* Caffe's rule: first r with t_r >= v(r+1) */
            csum += v[r - 1];
            const REAL tr = (csum - (REAL)1) / (REAL)r;
            if (r == L || tr >= v[r]) { t = tr; stop = r; break; }
        }
        tau[i] = t;
        rho[i] = stop;
        for (int l = 0; l < L; ++l) {
            const REAL z = s[base + (i64)l * B] - t;
            out[base + (i64)l * B] = z > (REAL)0 ? z : z * leak;
        }
    }
}

extern "C" __global__ void simplex_vjp(const REAL* __restrict__ g, const REAL* __restrict__ s,
                                       const REAL* __restrict__ tau, const int* __restrict__ rho,
                                       REAL leak, REAL* __restrict__ out, int A, int L, int B)
{
    GRID_LOOP(i, (i64)A * B) {
        const i64 base = (i / B) * (i64)L * B + i % B;
        const REAL t = tau[i];
        const int r = rho[i];
        REAL total = (REAL)0;
        for (int l = 0; l < L; ++l) {
            const i64 q = base + (i64)l * B;
            total += (s[q] > t ? (REAL)1 : leak) * g[q];
        }
        const REAL all = (REAL)1 / (REAL)L;
        const REAL inv_rho = (REAL)1 / (REAL)r;
        for (int l = 0; l < L; ++l) {
            const i64 q = base + (i64)l * B;
            const bool active = s[q] > t;
            const REAL a = active ? (REAL)1 : leak;
            const REAL dt = r == L ? all : (active ? inv_rho : (REAL)0);
            out[q] = a * g[q] - dt * total;
        }
    }
}

extern "C" __global__ void tile_windows(const REAL* __restrict__ a, REAL* __restrict__ out,
                                        int N, int C, int H, int W, int ny, int nx,
                                        int th, int tw, int ph, int pw, int p)
{
    GRID_LOOP(idx, (i64)C * N * ny * nx * ph * pw) {
        i64 r = idx;
        const int x = (int)(r % pw); r /= pw;
        const int y = (int)(r % ph); r /= ph;
        const int j = (int)(r % nx); r /= nx;
        const int i = (int)(r % ny); r /= ny;
        const int n = (int)(r % N);
        const int c = (int)(r / N);
        const int yy = i * th - p + y, xx = j * tw - p + x;
        out[idx] = (yy >= 0 && yy < H && xx >= 0 && xx < W) ? a[(((i64)n * C + c) * H + yy) * W + xx] : (REAL)0;
    }
}

extern "C" __global__ void tile_cores(const REAL* __restrict__ a, REAL* __restrict__ out,
                                      int N, int C, int H, int W, int ny, int nx, int th, int tw)
{
    GRID_LOOP(idx, (i64)C * N * ny * nx * th * tw) {
        i64 r = idx;
        const int x = (int)(r % tw); r /= tw;
        const int y = (int)(r % th); r /= th;
        const int j = (int)(r % nx); r /= nx;
        const int i = (int)(r % ny); r /= ny;
        const int n = (int)(r % N);
        const int c = (int)(r / N);
        const int yy = i * th + y, xx = j * tw + x;
        out[idx] = (yy < H && xx < W) ? a[(((i64)n * C + c) * H + yy) * W + xx] : (REAL)0;
    }
}

extern "C" __global__ void tile_assemble(const REAL* __restrict__ t, REAL* __restrict__ out,
                                         int N, int O, int H, int W, int ny, int nx,
                                         int th, int tw, int rh, int rw)
{
    GRID_LOOP(idx, (i64)N * O * H * W) {
        i64 r = idx;
        const int x = (int)(r % W); r /= W;
        const int y = (int)(r % H); r /= H;
        const int o = (int)(r % O);
        const int n = (int)(r / O);
        const int i = y / th, j = x / tw;
        out[idx] = t[((((i64)o * N + n) * ny + i) * nx + j) * rh * rw + (i64)(y - i * th) * rw + (x - j * tw)];
    }
}

extern "C" __global__ void freq_mix(const REAL* __restrict__ x, const REAL* __restrict__ K,
                                    REAL* __restrict__ y, int O, int T, int NF)
{
    GRID_LOOP(i, (i64)T * NF) {
        const i64 t = i / NF, f = i % NF;
        REAL xr[CIN], xi[CIN];
#pragma unroll
        for (int c = 0; c < CIN; ++c) {
            const i64 q = 2 * (((i64)c * T + t) * NF + f);
            xr[c] = x[q];
            xi[c] = x[q + 1];
        }
        for (int o = 0; o < O; ++o) {
            REAL ar = (REAL)0, ai = (REAL)0;
            const REAL* k = K + 2 * ((i64)o * CIN * NF + f);
#pragma unroll
            for (int c = 0; c < CIN; ++c) {
                const REAL kr = k[2 * (i64)c * NF], ki = k[2 * (i64)c * NF + 1];
                ar += kr * xr[c] - ki * xi[c];
                ai += kr * xi[c] + ki * xr[c];
            }
            const i64 q = 2 * (((i64)o * T + t) * NF + f);
            y[q] = ar;
            y[q + 1] = ai;
        }
    }
}
'''

# C++ stand-ins for CUDA's built-ins: one block of one thread, so every grid-stride loop runs
# over all its outputs in one call
_EMULATION_PRELUDE = r'''
#include <math.h>
struct crfgrad_dim3 { unsigned int x, y, z; };
static const crfgrad_dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
static const crfgrad_dim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
#define __global__
'''

# argument kinds per kernel: p = array, i = int32, r = REAL scalar
_SIGNATURES = {
    'lattice_blur': 'ppppp' + 'iiiii',
    'lattice_tap_masks': 'pp' + 'ii',
    'lattice_taps_grad': 'pppp' + 'iiiiii',
    'lattice_blur_scalar': 'pppp' + 'iii',
    'lattice_slice': 'ppppp' + 'iiii',
    'lattice_splat': 'pppppp' + 'iii',
    'lattice_points': 'ppppp' + 'ii',
    'lattice_tap_table': 'pppp' + 'ii',
    'lattice_invert_taps': 'pp' + 'ii',
    'simplex_project': 'pppp' + 'r' + 'iii',
    'simplex_vjp': 'pppp' + 'r' + 'p' + 'iii',
    'tile_windows': 'pp' + 'i' * 11,
    'tile_cores': 'pp' + 'i' * 8,
    'tile_assemble': 'pp' + 'i' * 10,
    'freq_mix': 'ppp' + 'iii',
}


def blur_block(num_out):
    """(OB, nob): outputs per thread and thread blocks per vertex of :func:`lattice_blur`."""
    ob = min(int(num_out), _MAX_BLUR_BLOCK)
    return ob, -(-int(num_out) // ob)


def _real_name(dtype):
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return 'float'
    if dtype == np.float64:
        return 'double'
    raise TypeError('the CUDA kernels take float32 or float64 arrays, got %s' % dtype)


class KernelSet:
    """The kernels for one array module: ``launch(name, n, args, dtype, **defines)`` runs kernel
    ``name`` over ``n`` outputs; args are arrays (C-contiguous, of the module), Python ints (int32)
    and floats (REAL); ``defines`` are the compile-time sizes (OB, CIN, LMAX, DMAX) and FMAD=0 for
    a module built without multiply-add contraction.  ``xp`` is the array module; ``emulated`` is True for the C++ build."""

    def __init__(self, xp, emulated=False):
        self.xp = xp
        self.emulated = bool(emulated)
        self._modules = {}
        self._functions = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ compilation
    def _module(self, dtype, defines):
        key = (_real_name(dtype),) + tuple(sorted(defines.items()))
        mod = self._modules.get(key)
        if mod is None:
            with self._lock:
                mod = self._modules.get(key)
                if mod is None:
                    opts = ['-DREAL=%s' % key[0]] + ['-D%s=%d' % (k, v) for k, v in key[1:] if k != 'FMAD']
                    fmad = bool(defines.get('FMAD', 1))
                    if self.emulated:
                        mod = _compile_host(opts + ([] if fmad else ['-ffp-contract=off']))
                    else:
                        import cupy          # only ever reached with CuPy arrays
                        mod = cupy.RawModule(code=SOURCE, options=tuple(opts + ([] if fmad else ['--fmad=false'])))
                    self._modules[key] = mod
        return mod

    # ------------------------------------------------------------------ launching
    def launch(self, name, n, args, dtype, **defines):
        sig = _SIGNATURES[name]
        if len(sig) != len(args):
            raise TypeError('%s takes %d arguments, got %d' % (name, len(sig), len(args)))
        n = int(n)
        if n <= 0:
            return
        real = np.dtype(dtype).type
        for kind, a in zip(sig, args):
            if kind == 'p' and not (a.flags.c_contiguous and type(a).__module__.split('.')[0] ==
                                    self.xp.__name__):
                raise TypeError('%s: array arguments must be C-contiguous %s arrays' % (name, self.xp.__name__))
        mod = self._module(dtype, defines)
        if self.emulated:
            fn = getattr(mod, name)
            conv = []
            for kind, a in zip(sig, args):
                if kind == 'p':
                    conv.append(ctypes.c_void_p(a.ctypes.data))
                elif kind == 'i':
                    conv.append(ctypes.c_int(_int32(a)))
                else:
                    conv.append((ctypes.c_float if real is np.float32 else ctypes.c_double)(a))
            fn.restype = None
            fn(*conv)
            return
        conv = []
        for kind, a in zip(sig, args):
            if kind == 'p':
                conv.append(a)
            elif kind == 'i':
                conv.append(np.int32(_int32(a)))
            else:
                conv.append(real(a))
        fkey = (id(mod), name)
        fn = self._functions.get(fkey)
        if fn is None:
            fn = self._functions[fkey] = mod.get_function(name)
        blocks = max(1, min(_MAX_BLOCKS, -(-n // _THREADS)))
        fn((blocks,), (_THREADS,), tuple(conv))


def _int32(v):
    v = int(v)
    if not -(1 << 31) <= v < (1 << 31):
        raise OverflowError('a kernel size argument does not fit int32: %d' % v)
    return v


# ---------------------------------------------------------------------- host (emulated) build
_HOST_CACHE = {}
_HOST_LOCK = threading.Lock()


def host_compiler():
    """The C++ compiler used for emulation (CXX, else c++/g++/clang++ on PATH), or None."""
    for cand in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _compile_host(opts):
    """ctypes library of SOURCE built for the host with the CUDA built-ins emulated."""
    cxx = host_compiler()
    if cxx is None:
        raise RuntimeError('CRFGRAD_EMULATE_RAWKERNEL needs a C++ compiler (set CXX)')
    code = _EMULATION_PRELUDE + SOURCE
    digest = hashlib.sha1((code + ' '.join(opts) + cxx).encode()).hexdigest()[:16]
    with _HOST_LOCK:
        lib = _HOST_CACHE.get(digest)
        if lib is not None:
            return lib
        folder = tempfile.mkdtemp(prefix='crfgrad_emul_')
        src = os.path.join(folder, 'kernels.cpp')
        out = os.path.join(folder, 'kernels.so')
        with open(src, 'w') as fh:
            fh.write(code)
        try:
            proc = subprocess.run([cxx, '-O2', '-shared', '-fPIC', '-o', out, src] + list(opts),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError('compiling the emulated CUDA kernels failed:\n' + proc.stderr[-4000:])
            lib = ctypes.CDLL(out)
        finally:
            shutil.rmtree(folder, ignore_errors=True)     # the loaded library stays mapped
        _HOST_CACHE[digest] = lib
        return lib


# ---------------------------------------------------------------------- selection
_SETS = {}


def _flag(name):
    return os.environ.get(name, '').strip().lower() not in ('', '0', 'false', 'no', 'off')


def enabled():
    """False when CRFGRAD_NO_RAWKERNEL asks for the array code."""
    return not _flag('CRFGRAD_NO_RAWKERNEL')


def kernels(xp):
    """The :class:`KernelSet` for arrays of ``xp``: CuPy, or NumPy when CRFGRAD_EMULATE_RAWKERNEL is
    set (tests); None when CRFGRAD_NO_RAWKERNEL is set or for other modules (use the array code).
    Both variables are read at every call."""
    name = getattr(xp, '__name__', '')
    if not enabled() or name not in ('numpy', 'cupy'):
        return None
    if name == 'numpy' and not _flag('CRFGRAD_EMULATE_RAWKERNEL'):
        return None
    ks = _SETS.get(name)
    if ks is None:
        ks = _SETS[name] = KernelSet(xp, emulated=(name == 'numpy'))
    return ks
