"""MoVE feed-forward (mixture of view experts, docs/method.md §2.1): per token, its view's LayerNorm -> fc1 + bias
-> exact GELU -> fc2 + bias, plus the residual, over a packed token buffer.

    out[t] = x[t] + fc2_e(gelu(fc1_e(LN_e(x[t]))))      e = view_id[t] (0 frontal incl. CLS, 1 lateral)

``move_ffn_ref`` is the plain PyTorch reference. ``move_ffn`` runs the Triton path where available:

* Routing (:func:`build_routing`, built once per batch, on the host at collation, and shared by all
  blocks): tokens grouped by expert into a padded slot layout whose every BLOCK_M tile belongs to one expert.
  The slot count is the upper bound ``(cdiv(N, BLOCK_M) + E - 1) * BLOCK_M``, a function of N only; tiles
  past the last used one carry expert -1 and every kernel returns on them.
* Forward: LayerNorm kernel gathers token rows into the slot layout; grouped GEMM fc1 with fused
  bias + GELU epilogue; grouped GEMM fc2 with fused bias + residual epilogue scattering straight back to
  token order. No slice/cat copies of the token buffer.
* Backward: grouped GEMM dz1 = (dy W2_e) * gelu'(z1) (gathers dy by slot; its epilogue writes the tile's
  column sums of dz1); grouped GEMM dh = dz1 W1_e; weight gradients by a grouped reduction GEMM over each
  expert's slot segment; LayerNorm backward (one program per tile) scatters dx (+ the residual's dy) to token
  order and writes the tile's column sums for the LayerNorm and fc2-bias gradients. One small kernel reduces
  all per-tile sums per expert segment (contiguous in slot order) in a fixed order: deterministic, no
  atomics. Forward and backward issue no host sync (no nonzero / bincount / repeat_interleave / .item()).

Tiles (sm_90): 128-row slot tiles (fixed: the routing pads every expert segment to them); the rest of the tile
comes from a small candidate set per compute kind (``GEMM_CONFIGS`` / ``WGRAD_CONFIGS``, see the launchers
below), chosen by a deterministic table keyed on (slot-count bucket, N, K): every process picks the same tiles,
so runs stay bitwise reproducible and no training step benchmarks anything. ``MEDST_FAST_AUTOTUNE=1`` opts
into triton.autotune over the same set on CUDA (that breaks bitwise resume). tests/test_sm90_compile.py
compiles every config of the sets (no spills, wgmma in every bf16 GEMM); no persistent scheduling (unmeasured).

Mixed precision (``compute_dtype``, by default the autocast dtype when autocast is on): the GEMM operands
(h, gelu(z1), dy, dz1 and the weights) are in the compute dtype, every product accumulates in fp32. With an
fp32 residual stream under bf16 autocast this is what the eager module computes: LayerNorm reads and computes
fp32, h / z1 / gelu(z1) are bf16, the branch is rounded to bf16 and added to the fp32 residual; dx and the
parameter gradients come back in the parameters' dtype (fp32 master weights: fp32). The biases are added in
fp32 unrounded. The custom ops have no autocast registration, deliberately: for an op without an autocast
kernel the Autocast dispatch key falls through, so autocast never re-casts their inputs (a registered
autocast kernel would cast x to bf16 and lose the fp32 residual stream); the dtype decision is the explicit
``compute_dtype`` argument, and the implementations run with autocast off.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._utils import (as_operand, autotune_launch, check_compute_dtype, dot_precision, fp32_kind, interpreting,
                     launch, next_pow2, round_to, triton_helper, use_triton)

tl = None  # bound to triton.language by _utils.jit_kernel on first launch (keeps Triton an optional import)

N_EXPERTS = 2
BLOCK_M = 128  # slot tile height (the GEMMs' M tile): the routing pads every expert's group to a multiple of it


def move_ffn_ref(x, view_id, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_eps: float = 1e-6) -> torch.Tensor:
    """Reference. x: (N, D); view_id: (N,) int in {0, 1}; weights stacked per expert (see :func:`move_ffn`)."""
    out = x
    for e in range(ln_w.shape[0]):
        idx = (view_id == e).nonzero().squeeze(1)
        xe = x.index_select(0, idx)
        h = F.layer_norm(xe, (x.shape[1],), ln_w[e], ln_b[e], ln_eps)
        y = F.linear(F.gelu(F.linear(h, fc1_w[e], fc1_b[e])), fc2_w[e], fc2_b[e])
        out = out.index_add(0, idx, y.to(x.dtype))
    return out


class MoveRouting(NamedTuple):
    rows: torch.Tensor  # (n_tiles * BLOCK_M,) int32: token index of each slot, -1 for padding
    tile_expert: torch.Tensor  # (n_tiles,) int32: expert of each slot tile, -1 past the used tiles
    seg: torch.Tensor  # (E + 1,) int32: slot offsets of the expert segments (multiples of BLOCK_M)

    def to(self, device, non_blocking: bool = False) -> "MoveRouting":
        """The routing on another device (built on the host at collation, shipped with the batch)."""
        return MoveRouting(*(t.to(device, non_blocking=non_blocking) for t in self))


def build_routing(view_id: torch.Tensor, n_experts: int = N_EXPERTS, block_m: int = BLOCK_M) -> MoveRouting:
    """Group tokens by view into BLOCK_M-aligned expert segments.

    Build once per batch and pass the result to every block's :func:`move_ffn` call. Works on CPU tensors:
    build it on the host at collation from the CPU ``view_id`` and ship it with the batch (``.to(device)``),
    so that the forward pass issues no host sync (on a GPU tensor the ``bincount`` here would sync). The number
    of tiles, hence every shape, depends only on (N, n_experts, block_m), never on the view mix.
    """
    if view_id.dim() != 1 or view_id.dtype.is_floating_point or view_id.dtype == torch.bool:
        raise ValueError(f"kernels/move_ffn.py: view_id must be a 1-D integer tensor, got {view_id.dtype} "
                         f"{tuple(view_id.shape)}")
    n = view_id.numel()
    dev = view_id.device
    v = view_id.long()
    counts = torch.bincount(v, minlength=n_experts)[:n_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    seg = torch.cat([zero, padded.cumsum(0)])
    first = torch.cat([zero, counts.cumsum(0)])[:-1]  # first sorted position of each expert's tokens
    order = torch.sort(v, stable=True).indices
    sv = v[order]
    dest = seg[sv] + torch.arange(n, device=dev) - first[sv]
    n_tiles = (n + block_m - 1) // block_m + n_experts - 1
    rows = torch.full((n_tiles * block_m,), -1, dtype=torch.int32, device=dev)
    rows = rows.index_put((dest,), order.to(torch.int32))
    starts = torch.arange(n_tiles, device=dev) * block_m
    te = torch.bucketize(starts, seg[1:], right=True)
    tile_expert = torch.where(te >= n_experts, -1, te).to(torch.int32)
    return MoveRouting(rows, tile_expert, seg.to(torch.int32))


# ------------------------------------------------------------------------------------------------ kernels
def _ln_fwd_kernel(X, ROWS, TILE_E, LNW, LNB, H, MEAN, RSTD, D, eps,
                   SUB: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # SUB slot rows per program (a full BLOCK_M x D tile would not fit in registers at D = 768).
    pid = tl.program_id(0)
    tile = pid // (BLOCK_M // SUB)
    e = tl.load(TILE_E + tile)
    if e >= 0:
        slots = pid * SUB + tl.arange(0, SUB)
        r = tl.load(ROWS + slots)
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        m2 = (r[:, None] >= 0) & cm[None, :]
        x = tl.load(X + r.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(cm[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        w = tl.load(LNW + e * D + cols, mask=cm, other=0.0).to(tl.float32)
        b = tl.load(LNB + e * D + cols, mask=cm, other=0.0).to(tl.float32)
        h = xc * rstd[:, None] * w[None, :] + b[None, :]
        h = tl.where(r[:, None] >= 0, h, 0.0)  # padding slots are exact zeros: the weight-gradient sums read them
        h = round_to(h, H.dtype.element_ty, INTERP)  # LayerNorm in fp32, its output in the compute dtype
        tl.store(H + slots.to(tl.int64)[:, None] * D + cols[None, :], h, mask=cm[None, :])
        tl.store(MEAN + slots, mean)
        tl.store(RSTD + slots, rstd)


def _ln_bwd_kernel(DH, X, ROWS, TILE_E, LNW, MEAN, RSTD, DOUT, DX, PART, D, part_stride,
                   SUB: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """LayerNorm backward of one slot tile, SUB rows at a time; dx (+ the residual's dy) scattered to token
    order. The tile's column sums of dh * xhat, dh and dy (LayerNorm weight / bias and fc2 bias gradients)
    go to row ``tile`` of PART: the expert segments are contiguous runs of tiles, so _seg_sum_kernel reduces
    them per expert in a fixed order (deterministic, no atomics)."""
    tile = tl.program_id(0)
    e = tl.load(TILE_E + tile)
    if e >= 0:
        cols = tl.arange(0, BLOCK_D)
        cm = cols < D
        w = tl.load(LNW + e * D + cols, mask=cm, other=0.0).to(tl.float32)
        acc_w = tl.zeros([BLOCK_D], tl.float32)
        acc_b = tl.zeros([BLOCK_D], tl.float32)
        acc_y = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, BLOCK_M, SUB):
            slots = tile * BLOCK_M + s0 + tl.arange(0, SUB)
            r = tl.load(ROWS + slots)
            m2 = (r >= 0)[:, None] & cm[None, :]
            r64 = r.to(tl.int64)
            x = tl.load(X + r64[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            dh = tl.load(DH + slots.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + slots)
            rstd = tl.load(RSTD + slots)
            xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
            gw = dh * w[None, :]
            c1 = tl.sum(xhat * gw, 1) / D
            c2 = tl.sum(gw, 1) / D
            dx = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            dy = tl.load(DOUT + r64[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(DX + r64[:, None] * D + cols[None, :], round_to(dx + dy, DX.dtype.element_ty, INTERP), mask=m2)
            acc_w += tl.sum(dh * xhat, 0)
            acc_b += tl.sum(dh, 0)
            acc_y += tl.sum(dy, 0)
        p = PART + tile.to(tl.int64) * part_stride + cols
        tl.store(p, acc_w, mask=cm)
        tl.store(p + D, acc_b, mask=cm)
        tl.store(p + 2 * D, acc_y, mask=cm)


def _seg_sum_kernel(PART, SEG, OUT, W, TILE_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """OUT[e, w] = sum of PART[t, w] over the tiles t of expert e's slot segment, always in the same order."""
    pid_w = tl.program_id(0)
    e = tl.program_id(1)
    t0 = tl.load(SEG + e) // TILE_ROWS
    t1 = tl.load(SEG + e + 1) // TILE_ROWS
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    cm = cols < W
    acc = tl.zeros([BLOCK_T, BLOCK_W], tl.float32)
    for t in range(t0, t1, BLOCK_T):
        tt = t + tl.arange(0, BLOCK_T)
        acc += tl.load(PART + tt.to(tl.int64)[:, None] * W + cols[None, :], mask=(tt < t1)[:, None] & cm[None, :],
                       other=0.0)
    tl.store(OUT + e * W + cols, tl.sum(acc, 0), mask=cm)


@triton_helper
def _grouped_pid(pid, n_m, n_n, GROUP: tl.constexpr):
    """Program pid -> (pid_m, pid_n) in groups of GROUP row tiles that sweep the columns together, so the
    operand tiles they share are read while still in L2 (Triton's grouped ordering)."""
    in_group = GROUP * n_n
    first_m = (pid // in_group) * GROUP
    size_m = tl.minimum(n_m - first_m, GROUP)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


def _grouped_mm_kernel(A, ROWS, TILE_E, B, BIAS, C, AUX, RES, PART, n_tiles, N, K, part_stride,
                       A_GATHER: tl.constexpr, B_NCONTIG: tl.constexpr, EPI: tl.constexpr, PREC: tl.constexpr,
                       INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """C[m, n] = epilogue(sum_k A[m, k] B_e[k, n]) for the slot tile m of expert e = TILE_E[tile].

    B is the (E, ., .) weight stack: B_e[k, n] at e*N*K + n*K + k, or at e*N*K + k*N + n when B_NCONTIG (the
    strides are compile-time, so loads vectorise and pipeline). The compute dtype CT is the weights' dtype:
    A tiles are taken to CT, products accumulate in fp32.
    EPI 0: C = acc.  1: AUX = round_CT(acc + bias_e) (pre-activation), C = round_CT(gelu(AUX)).
    2: C[ROWS[m]] = RES[ROWS[m]] + round_CT(acc + bias_e) (scatter to token order).
    3: C = round_CT(acc * gelu'(AUX)), and the tile's column sums of C (the fc1 bias gradient) to PART[tile].
    A_GATHER: A is in token order and is read through ROWS (padding slots read zeros).
    """
    CT: tl.constexpr = B.dtype.element_ty
    pid_m, pid_n = _grouped_pid(tl.program_id(0), n_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(TILE_E + pid_m)
    if e >= 0:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        if A_GATHER or EPI == 2:
            r = tl.load(ROWS + rm)
        if A_GATHER:
            a_ptr = A + r.to(tl.int64)[:, None] * K + rk[None, :]
            a_ok = (r >= 0)[:, None]
        else:
            a_ptr = A + rm.to(tl.int64)[:, None] * K + rk[None, :]
            a_ok = (rm >= 0)[:, None]
        nm = rn < N
        if B_NCONTIG:
            b_ptr = B + e.to(tl.int64) * N * K + rk[:, None] * N + rn[None, :]
            b_step = BLOCK_K * N
        else:
            b_ptr = B + e.to(tl.int64) * N * K + rn[None, :] * K + rk[:, None]
            b_step = BLOCK_K
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + rk) < K
            a = tl.load(a_ptr, mask=a_ok & km[None, :], other=0.0)
            b = tl.load(b_ptr, mask=km[:, None] & nm[None, :], other=0.0)
            acc = tl.dot(as_operand(a, CT, INTERP), as_operand(b, CT, INTERP), acc, input_precision=PREC)
            a_ptr += BLOCK_K
            b_ptr += b_step
        c_off = rm.to(tl.int64)[:, None] * N + rn[None, :]
        if EPI == 0:
            tl.store(C + c_off, acc, mask=nm[None, :])
        elif EPI == 1:
            z = acc + tl.load(BIAS + e * N + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            z = round_to(z, CT, INTERP)  # the stored pre-activation: backward's gelu' reads the same value
            tl.store(AUX + c_off, z, mask=nm[None, :])
            g = round_to(0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476)), CT, INTERP)  # exact GELU
            tl.store(C + c_off, g, mask=nm[None, :])
        elif EPI == 2:
            ok = (r >= 0)[:, None] & nm[None, :]
            o_off = r.to(tl.int64)[:, None] * N + rn[None, :]
            y = acc + tl.load(BIAS + e * N + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            res = tl.load(RES + o_off, mask=ok, other=0.0).to(tl.float32)
            # the branch is rounded to the compute dtype before the residual add, as the eager module does
            y = round_to(res + round_to(y, CT, INTERP), C.dtype.element_ty, INTERP)
            tl.store(C + o_off, y, mask=ok)
        else:
            z = tl.load(AUX + c_off, mask=nm[None, :], other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            dz = round_to(acc * (cdf + z * pdf), CT, INTERP)
            tl.store(C + c_off, dz, mask=nm[None, :])
            tl.store(PART + pid_m.to(tl.int64) * part_stride + rn, tl.sum(dz, 0), mask=nm)


def _grouped_wgrad_kernel(A, ROWS, BM, SEG, DW, N, K,
                          A_GATHER: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    """DW[e, n, k] = sum over expert e's slots m of A[m, n] BM[m, k]: a GEMM whose reduction runs over the
    expert's slot segment [SEG[e], SEG[e+1]) in steps of BLOCK_R (the bias sums come from the PART rows)."""
    CT: tl.constexpr = BM.dtype.element_ty
    pid_n, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    e = tl.program_id(1)
    start = tl.load(SEG + e)
    end = tl.load(SEG + e + 1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nm = rn < N
    km = rk < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for m0 in range(start, end, BLOCK_R):
        rm = m0 + tl.arange(0, BLOCK_R)
        if A_GATHER:
            r = tl.load(ROWS + rm)
            a_row = r.to(tl.int64)
            a_ok = r >= 0
        else:
            a_row = rm.to(tl.int64)
            a_ok = rm >= 0
        a = tl.load(A + a_row[:, None] * N + rn[None, :], mask=a_ok[:, None] & nm[None, :], other=0.0)
        b = tl.load(BM + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=km[None, :], other=0.0)
        acc = tl.dot(tl.trans(as_operand(a, CT, INTERP)), as_operand(b, CT, INTERP), acc, input_precision=PREC)
    tl.store(DW + e * N * K + rn[:, None] * K + rk[None, :], acc, mask=nm[:, None] & km[None, :])


# ---------------------------------------------------------------------------------------------- launchers
_SUB = 4


class GemmConfig(NamedTuple):
    """Tile of the grouped GEMM (its BLOCK_M is always the slot tile, BLOCK_M = 128)."""
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class WgradConfig(NamedTuple):
    """Tile of the weight-gradient GEMM: a block_n x block_k tile of dW, reduced over block_r slots a step."""
    block_r: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The candidate sets, per compute kind ("mma": bf16 / fp16 on the tensor cores; "tf32": fp32 operands on them;
# "fp32": exact ieee FMA, the parity path; one config each for the last two). The mma and fp32 configs are
# compiled for sm_90a at ViT-B shapes by tests/test_sm90_compile.py (no spills, shared memory <= 227 KB, wgmma)
# and run under the interpreter by tests/test_kernels_move_ffn.py, so whatever the table or the autotuner picks is a
# checked binary; the tf32 one is compiled for sm_90a too (no spills, wgmma) and runs under the interpreter
# (tests/test_kernels_device.py).
#   0: 128x128x64, two warpgroups (wgmma m64 each), 3 stages of prefetch, 96 KB smem (the former fixed tile)
#   1: 128x128x64, two warpgroups, 4 stages (128 KB): deeper prefetch for the long K = 3072 loops
#   2: 128x128x128, two warpgroups, 3 stages (192 KB): half the loop trips on the short K = 768 loops
#   3: 128x64x64, one warpgroup, 4 stages (96 KB): twice the programs on the narrow (N = 768) GEMMs, fewer
#      idle SMs in the last wave at small batches
# Not in the set: 128x256 tiles (8 or 16 warps) and 128x128 on one warpgroup. Their 128 fp32 accumulator
# registers per thread leave too little for the epilogues: ptxas spills 24-1036 bytes in the bias + GELU,
# residual-scatter and gelu' epilogues (sm_90a, triton 3.8); only the plain dh GEMM compiles clean.
# Exact fp32: narrow K steps so the operand slices each thread holds fit in registers (wider ones spill).
GEMM_CONFIGS = {
    "mma": (GemmConfig(128, 64, 8, 3), GemmConfig(128, 64, 8, 4), GemmConfig(128, 128, 8, 3),
            GemmConfig(64, 64, 4, 4)),
    "fp32": (GemmConfig(64, 16, 8, 2),),
    # TF32 (fp32 operands on the tensor cores, torch.get_float32_matmul_precision() 'high'/'medium'): the mma
    # 128x128 tile over K steps of 32, as an fp32 operand takes twice the bytes of a bf16 one (96 KB smem).
    "tf32": (GemmConfig(128, 32, 8, 3),),
}
#   0: 128x128 over 64-slot steps, two warpgroups, 3 stages (the former fixed tile)
#   1: 128x256, two warpgroups: half the programs, each reading its slot rows once for twice the columns
#   2: 128x128 over 32-slot steps, one warpgroup, 4 stages
#   3: 64x128, one warpgroup, 4 stages: twice the programs, which evens out the two experts' unequal
#      segment lengths (the frontal segment is about twice the lateral one at half-lateral batches)
WGRAD_CONFIGS = {
    "mma": (WgradConfig(64, 128, 128, 8, 3), WgradConfig(64, 128, 256, 8, 3), WgradConfig(32, 128, 128, 4, 4),
            WgradConfig(64, 64, 128, 4, 4)),
    "fp32": (WgradConfig(16, 64, 64, 8, 2),),
    "tf32": (WgradConfig(32, 128, 128, 8, 2),),  # 128x128 over 32-slot steps, fp32 operands (64 KB smem)
}
# Slot-count buckets (the GEMMs' M): < 16384 slots (up to ~55 ViT-B studies of which half with a lateral),
# < 32768 (~110), more. The selection and the autotuner's cache both key on the bucket, not the exact count,
# so batches of slightly different token counts share one pick.
TOKEN_BUCKETS = (16384, 32768)

# The default selection: (token bucket, N, K) -> index into the kind's set, at the ViT-B GEMMs
# (fc1 / dz1: N = 3072, K = 768; fc2 / dh: N = 768, K = 3072; weight gradients: dW1 3072 x 768, dW2
# 768 x 3072). A FIRST GUESS from tile counts against the H200's 132 SMs, NOT a measurement: replace it with
# the winners of benchmarks/bench_ops.py (MoVE FFN config rows) once benchmarks/device_check.sh has run on a
# GPU. A shape not in the table takes config 0. A table lookup, not timing, so that every process picks the
# same tiles: the reduction order, hence the bits, depends on the tile (kill -9 + resume is bitwise exact).
_GEMM_TABLE = {
    (0, 3072, 768): 0, (1, 3072, 768): 2, (2, 3072, 768): 2,  # short K: fewer, larger K steps once M is large
    (0, 768, 3072): 3, (1, 768, 3072): 1, (2, 768, 3072): 1,  # narrow N: 128x64 at small M, else deeper prefetch
}
_WGRAD_TABLE = {
    (0, 768, 3072): 3, (0, 3072, 768): 3,  # small batch: finer tiles even out the unequal expert segments
}
_GROUP = 8
AUTOTUNE_ENV = "MEDST_FAST_AUTOTUNE"
_forced = {"gemm": None, "wgrad": None}


def _cfg_kind(compute_dtype: torch.dtype) -> str:
    return fp32_kind(compute_dtype)  # "mma", "tf32" or "fp32" (exact)


def token_bucket(slots: int) -> int:
    """Index of the bucket of TOKEN_BUCKETS that a slot count falls in."""
    return sum(slots >= b for b in TOKEN_BUCKETS)


def gemm_config(compute_dtype: torch.dtype, slots: int, n: int, k: int) -> GemmConfig:
    """The grouped GEMM's tile for C (slots x n) = A (slots x k) B: the forced one (see :func:`forced_configs`),
    else the table's pick for the mma kind, else the kind's first config. Deterministic: a pure lookup."""
    kind = _cfg_kind(compute_dtype)
    if _forced["gemm"] is not None:
        return _forced_for(kind, "gemm", GEMM_CONFIGS)
    return GEMM_CONFIGS[kind][_GEMM_TABLE.get((token_bucket(slots), n, k), 0) if kind == "mma" else 0]


def wgrad_config(compute_dtype: torch.dtype, slots: int, n: int, k: int) -> WgradConfig:
    """The weight-gradient GEMM's tile for dW (n x k) reduced over ``slots``; as :func:`gemm_config`."""
    kind = _cfg_kind(compute_dtype)
    if _forced["wgrad"] is not None:
        return _forced_for(kind, "wgrad", WGRAD_CONFIGS)
    return WGRAD_CONFIGS[kind][_WGRAD_TABLE.get((token_bucket(slots), n, k), 0) if kind == "mma" else 0]


def _forced_for(kind: str, which: str, sets: dict):
    cfg = _forced[which]
    if cfg not in sets[kind]:  # only checked binaries run: a tile outside the set was never compiled for sm_90
        raise ValueError(f"kernels/move_ffn.py: forced {which} config {cfg} is not in the {kind!r} set {sets[kind]}")
    return cfg


@contextlib.contextmanager
def forced_configs(gemm: Optional[GemmConfig] = None, wgrad: Optional[WgradConfig] = None):
    """Within the block every launch uses these tiles (each must belong to its kind's set), not the table's
    nor the autotuner's: for the tests (every config under the interpreter and the sm_90 compile) and the
    per-config benchmark rows."""
    saved = dict(_forced)
    _forced.update(gemm=gemm, wgrad=wgrad)
    try:
        yield
    finally:
        _forced.update(saved)


def autotune_enabled(t: torch.Tensor, compute_dtype: torch.dtype, which: str) -> bool:
    """``MEDST_FAST_AUTOTUNE=1`` opts into triton.autotune over the set, on CUDA tensors only, for the mma kind,
    when no config is forced. Never under the interpreter or on CPU / meta tensors (nothing is benchmarked
    there). It breaks bitwise resume: the pick comes from timings, which can differ between two processes."""
    return (os.environ.get(AUTOTUNE_ENV, "0") == "1" and t.is_cuda and not interpreting()
            and _cfg_kind(compute_dtype) == "mma" and _forced[which] is None)


def _fit(block: int, n: int) -> int:
    # small test shapes: no tile wider than the next power of two of the dimension (at least 16)
    return min(block, max(16, next_pow2(n)))


def _gemm_meta(cfg: GemmConfig, n: int, k: int):
    return {"BLOCK_N": _fit(cfg.block_n, n), "BLOCK_K": _fit(cfg.block_k, k)}, cfg.num_warps, cfg.num_stages


def _wgrad_meta(cfg: WgradConfig, n: int, k: int):
    return ({"BLOCK_R": cfg.block_r, "BLOCK_N": _fit(cfg.block_n, n), "BLOCK_K": _fit(cfg.block_k, k)},
            cfg.num_warps, cfg.num_stages)


def _candidates(configs, to_meta, n, k) -> tuple:
    """The set as (constexprs, num_warps, num_stages), fitted to (n, k), duplicates dropped (small shapes)."""
    out = []
    for cfg in configs:
        meta, w, s = to_meta(cfg, n, k)
        c = (tuple(sorted(meta.items())), w, s)
        if c not in out:
            out.append(c)
    return tuple(out)


def _mm(a, rows, tile_expert, w, n, k, c, *, b_ncontig, gather=False, epi=0, bias=None, aux=None, res=None,
        part=None):
    n_tiles, slots = tile_expert.numel(), rows.numel()
    args = (a, rows, tile_expert, w, bias if bias is not None else w, c, aux if aux is not None else c,
            res if res is not None else c, part if part is not None else c, n_tiles, n, k,
            part.stride(0) if part is not None else 0)
    meta = dict(A_GATHER=gather, B_NCONTIG=b_ncontig, EPI=epi, PREC=dot_precision(w.dtype), INTERP=interpreting(),
                BLOCK_M=BLOCK_M, GROUP_M=_GROUP)

    def grid(m):
        return (n_tiles * triton_cdiv(n, m["BLOCK_N"]),)

    if autotune_enabled(a, w.dtype, "gemm"):
        # EPI / A_GATHER / B_NCONTIG in the key: fc1 and dz1 share (N, K) but are different kernels
        autotune_launch(_grouped_mm_kernel, grid, _candidates(GEMM_CONFIGS["mma"], _gemm_meta, n, k),
                        ("N", "K", "EPI", "A_GATHER", "B_NCONTIG"), token_bucket(slots), *args, **meta)
        return
    tile, num_warps, num_stages = _gemm_meta(gemm_config(w.dtype, slots, n, k), n, k)
    launch(_grouped_mm_kernel, grid(tile), *args, **meta, **tile, num_warps=num_warps, num_stages=num_stages)


def _wgrad(a, rows, bm, seg, n, k, gather):
    dw = torch.empty(N_EXPERTS, n, k, device=a.device, dtype=torch.float32)
    args = (a, rows, bm, seg, dw, n, k)
    meta = dict(A_GATHER=gather, PREC=dot_precision(bm.dtype), INTERP=interpreting(), GROUP_N=_GROUP)

    def grid(m):
        return (triton_cdiv(n, m["BLOCK_N"]) * triton_cdiv(k, m["BLOCK_K"]), N_EXPERTS)

    if autotune_enabled(a, bm.dtype, "wgrad"):
        autotune_launch(_grouped_wgrad_kernel, grid, _candidates(WGRAD_CONFIGS["mma"], _wgrad_meta, n, k),
                        ("N", "K", "A_GATHER"), token_bucket(rows.numel()), *args, **meta)
        return dw
    tile, num_warps, num_stages = _wgrad_meta(wgrad_config(bm.dtype, rows.numel(), n, k), n, k)
    launch(_grouped_wgrad_kernel, grid(tile), *args, **meta, **tile, num_warps=num_warps, num_stages=num_stages)
    return dw


def _seg_sum(part, seg):
    w = part.shape[1]
    out = torch.empty(N_EXPERTS, w, device=part.device, dtype=torch.float32)
    launch(_seg_sum_kernel, (triton_cdiv(w, 128), N_EXPERTS), part, seg, out, w, TILE_ROWS=BLOCK_M, BLOCK_T=16,
           BLOCK_W=128)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _fwd_triton(x, rows, tile_expert, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps):
    """fc1_w / fc2_w are already in the compute dtype; x, the LayerNorm and the biases keep theirs."""
    n_slots, (n_tok, d), hdim = rows.numel(), x.shape, fc1_w.shape[1]
    dev, ct = x.device, fc1_w.dtype
    h = torch.empty(n_slots, d, device=dev, dtype=ct)
    mean = torch.empty(n_slots, device=dev, dtype=torch.float32)
    rstd = torch.empty(n_slots, device=dev, dtype=torch.float32)
    launch(_ln_fwd_kernel, (n_slots // _SUB,), x, rows, tile_expert, ln_w, ln_b, h, mean, rstd, d, float(eps),
           SUB=_SUB, INTERP=interpreting(), BLOCK_M=BLOCK_M, BLOCK_D=next_pow2(d))
    z1 = torch.empty(n_slots, hdim, device=dev, dtype=ct)
    g = torch.empty(n_slots, hdim, device=dev, dtype=ct)
    # fc1_w (E, H, D): B_e[n=h, k=d]
    _mm(h, rows, tile_expert, fc1_w, hdim, d, g, b_ncontig=False, epi=1, bias=fc1_b, aux=z1)
    out = torch.empty_like(x)
    # fc2_w (E, D, H): B_e[n=d, k=h]
    _mm(g, rows, tile_expert, fc2_w, d, hdim, out, b_ncontig=False, epi=2, bias=fc2_b, res=x)
    return out, h, mean, rstd, z1, g


def _bwd_triton(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g):
    n_slots, (n_tok, d), hdim = rows.numel(), x.shape, fc1_w.shape[1]
    dev, ct = x.device, fc1_w.dtype
    dout = dout.contiguous()
    dy = dout.to(ct)  # the GEMMs' operand; the residual gradient, LayerNorm and the fc2 bias read dout itself
    # per-tile column sums, reduced per expert by one _seg_sum launch:
    # [dLN weight | dLN bias | fc2 bias (sum dy) | fc1 bias (sum dz1)]
    part = torch.empty(tile_expert.numel(), 3 * d + hdim, device=dev, dtype=torch.float32)
    dz1 = torch.empty(n_slots, hdim, device=dev, dtype=ct)
    # dz1[m, h] = sum_d dy[m, d] W2_e[d, h] * gelu'(z1): B_e[n=h, k=d] = fc2_w[e, d, h]
    _mm(dy, rows, tile_expert, fc2_w, hdim, d, dz1, b_ncontig=True, gather=True, epi=3, aux=z1, part=part[:, 3 * d:])
    dh = torch.empty(n_slots, d, device=dev, dtype=torch.float32)
    # dh[m, d] = sum_h dz1[m, h] W1_e[h, d]: B_e[n=d, k=h] = fc1_w[e, h, d]
    _mm(dz1, rows, tile_expert, fc1_w, d, hdim, dh, b_ncontig=True)
    dw2 = _wgrad(dy, rows, g, seg, d, hdim, gather=True)
    dw1 = _wgrad(dz1, rows, h, seg, hdim, d, gather=False)
    dx = torch.empty_like(x)
    launch(_ln_bwd_kernel, (tile_expert.numel(),), dh, x, rows, tile_expert, ln_w, mean, rstd, dout, dx, part, d,
           part.stride(0), SUB=_SUB, INTERP=interpreting(), BLOCK_M=BLOCK_M, BLOCK_D=next_pow2(d), num_warps=8)
    sums = _seg_sum(part, seg)
    dlnw, dlnb, db2, db1 = (t.clone() for t in sums.split([d, d, d, hdim], 1))  # op outputs may not alias
    return dx, dlnw, dlnb, dw1, db1, dw2, db2


# The same slot-layout computation in PyTorch: the ops' implementation where the kernels cannot run (CPU
# without the interpreter, e.g. torch.compile tests), and a second check of the layout logic. Same rounding
# points as the kernels: products of compute-dtype operands accumulated in fp32.
def _per_expert(ec, fn):
    # every slot through every expert, keeping its own: 2x the flops but no (slots, H, D) weight gather
    out = fn(0)
    for i in range(1, N_EXPERTS):
        out = torch.where((ec == i)[:, None], fn(i), out)
    return out


def _slot_expert(rows, tile_expert):
    # expand, not repeat_interleave: a view plus a copy, never a host sync
    return tile_expert.long()[:, None].expand(-1, rows.numel() // tile_expert.numel()).reshape(-1)


def _slot_view(rows, tile_expert):
    e = _slot_expert(rows, tile_expert)
    ok = (rows >= 0) & (e >= 0)
    return ok, e.clamp_min(0), rows.long().clamp_min(0)


def _scatter_tokens(n_tok, rows, ok, v):
    # slot rows back to token order; padding slots all land, as zeros, on a spare row n_tok that is dropped
    dest = torch.where(ok, rows.long(), n_tok)
    buf = v.new_zeros(n_tok + 1, v.shape[1])
    return buf.index_copy(0, dest, torch.where(ok[:, None], v, 0))[:n_tok]


def _fwd_torch(x, rows, tile_expert, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps):
    ct = fc1_w.dtype
    ok, ec, r = _slot_view(rows, tile_expert)
    xs = torch.where(ok[:, None], x[r], 0).float()
    mean = xs.mean(1)
    rstd = torch.rsqrt(xs.var(1, unbiased=False) + eps)
    h = ((xs - mean[:, None]) * rstd[:, None] * ln_w[ec].float() + ln_b[ec].float()) * ok[:, None]
    h = h.to(ct)
    z1 = (_per_expert(ec, lambda i: h.float() @ fc1_w[i].float().t()) + fc1_b[ec].float()).to(ct)
    g = F.gelu(z1.float()).to(ct)
    y = (_per_expert(ec, lambda i: g.float() @ fc2_w[i].float().t()) + fc2_b[ec].float()).to(ct)
    out = (x.float() + _scatter_tokens(x.shape[0], rows, ok, y.float())).to(x.dtype)
    return out, h, mean, rstd, z1, g


def _bwd_torch(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g):
    ct = fc1_w.dtype
    ok, ec, r = _slot_view(rows, tile_expert)
    dy = torch.where(ok[:, None], dout[r], 0).float()
    dyc = dy.to(ct).float()  # the GEMM operand; db2 and the residual use dout itself
    zf = z1.float()
    gelu_grad = 0.5 * (1 + torch.erf(zf / math.sqrt(2))) + zf * torch.exp(-0.5 * zf * zf) / math.sqrt(2 * math.pi)
    dz1 = (_per_expert(ec, lambda i: dyc @ fc2_w[i].float()) * gelu_grad * ok[:, None]).to(ct)
    dh = _per_expert(ec, lambda i: dz1.float() @ fc1_w[i].float())
    oh = ((ec[:, None] == torch.arange(N_EXPERTS, device=ec.device)) & ok[:, None]).float()  # (M, E)
    dw2 = torch.einsum("me,md,mh->edh", oh, dyc, g.float())
    db2 = oh.t() @ dy
    dw1 = torch.einsum("me,mh,md->ehd", oh, dz1.float(), h.float())
    db1 = oh.t() @ dz1.float()
    xs = torch.where(ok[:, None], x[r], 0).float()
    xhat = (xs - mean[:, None]) * rstd[:, None] * ok[:, None]
    gw = dh * ln_w[ec].float()
    dxs = (gw - xhat * (xhat * gw).mean(1, keepdim=True) - gw.mean(1, keepdim=True)) * rstd[:, None]
    dx = (dout.float() + _scatter_tokens(x.shape[0], rows, ok, dxs)).to(x.dtype)
    dlnw = oh.t() @ (dh * xhat)
    dlnb = oh.t() @ dh
    return dx, dlnw, dlnb, dw1, db1, dw2, db2


# ------------------------------------------------------------------------------------- custom ops + autograd
# The ops register no autocast kernel on purpose: the Autocast dispatch key falls through for them, so autocast
# never re-casts their arguments (it would otherwise cast x to bf16 and lose the fp32 residual stream). The
# compute dtype is instead an explicit argument, resolved from the autocast state by move_ffn() when it is
# called, and the implementations below cast the weights themselves and run with autocast off.
def _compute_weight(w, ct):
    # (the weight as the GEMMs read it, the copy to save): the copy is returned as an op output, empty when no
    # cast is needed, so that backward reuses it instead of casting again
    if w.dtype == ct:
        return w, w.new_empty(0, dtype=ct)
    wc = w.to(ct).contiguous()
    return wc, wc


# Explicit schemas: torch 2.4 cannot infer one from the string annotations this module has (``from __future__
# import annotations``), and torch 2.5/2.6 cannot resolve a tuple alias; tests/test_torch_versions.py checks
# every medst_fast op carries one.
@torch.library.custom_op("medst_fast::move_ffn_fwd", mutates_args=(), schema=(
    "(Tensor x, Tensor rows, Tensor tile_expert, Tensor seg, Tensor ln_w, Tensor ln_b, Tensor fc1_w, "
    "Tensor fc1_b, Tensor fc2_w, Tensor fc2_b, float eps, ScalarType compute_dtype) -> (Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"))
def _move_ffn_fwd_op(x: torch.Tensor, rows: torch.Tensor, tile_expert: torch.Tensor, seg: torch.Tensor,
                     ln_w: torch.Tensor, ln_b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor,
                     fc2_w: torch.Tensor, fc2_b: torch.Tensor, eps: float,
                     compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        (w1, w1_saved), (w2, w2_saved) = _compute_weight(fc1_w, compute_dtype), _compute_weight(fc2_w, compute_dtype)
        fn = _fwd_triton if use_triton(x) else _fwd_torch
        return (*fn(x, rows, tile_expert, ln_w, ln_b, w1, fc1_b, w2, fc2_b, eps), w1_saved, w2_saved)


@_move_ffn_fwd_op.register_fake
def _(x, rows, tile_expert, seg, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps, compute_dtype):
    m, hdim, ct = rows.shape[0], fc1_w.shape[1], compute_dtype
    f32 = torch.float32
    saved = [w.new_empty(w.shape if w.dtype != ct else (0,), dtype=ct) for w in (fc1_w, fc2_w)]
    return (torch.empty_like(x), x.new_empty(m, x.shape[1], dtype=ct), x.new_empty(m, dtype=f32),
            x.new_empty(m, dtype=f32), x.new_empty(m, hdim, dtype=ct), x.new_empty(m, hdim, dtype=ct), *saved)


@torch.library.custom_op("medst_fast::move_ffn_bwd", mutates_args=(), schema=(
    "(Tensor dout, Tensor x, Tensor rows, Tensor tile_expert, Tensor seg, Tensor ln_w, Tensor fc1_w, "
    "Tensor fc2_w, Tensor h, Tensor mean, Tensor rstd, Tensor z1, Tensor g) -> (Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor)"))
def _move_ffn_bwd_op(dout: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, tile_expert: torch.Tensor,
                     seg: torch.Tensor, ln_w: torch.Tensor, fc1_w: torch.Tensor, fc2_w: torch.Tensor,
                     h: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, z1: torch.Tensor,
                     g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        fn = _bwd_triton if use_triton(x) else _bwd_torch
        return fn(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g)


@_move_ffn_bwd_op.register_fake
def _(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g):
    f32 = torch.float32
    e, d, hdim = ln_w.shape[0], x.shape[1], fc1_w.shape[1]
    return (torch.empty_like(x), x.new_empty(e, d, dtype=f32), x.new_empty(e, d, dtype=f32),
            x.new_empty(e, hdim, d, dtype=f32), x.new_empty(e, hdim, dtype=f32), x.new_empty(e, d, hdim, dtype=f32),
            x.new_empty(e, d, dtype=f32))


def _setup(ctx, inputs, output):
    x, rows, tile_expert, seg, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps, compute_dtype = inputs
    _, h, mean, rstd, z1, g, w1c, w2c = output
    ctx.dtypes = (ln_w.dtype, ln_b.dtype, fc1_w.dtype, fc1_b.dtype, fc2_w.dtype, fc2_b.dtype)
    # backward multiplies by the same compute-dtype weights as forward
    fc1_w = w1c if fc1_w.dtype != compute_dtype else fc1_w
    fc2_w = w2c if fc2_w.dtype != compute_dtype else fc2_w
    ctx.save_for_backward(x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g)


def _backward(ctx, dout, *_unused):
    x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h, mean, rstd, z1, g = ctx.saved_tensors
    dx, dlnw, dlnb, dw1, db1, dw2, db2 = _move_ffn_bwd_op(dout, x, rows, tile_expert, seg, ln_w, fc1_w, fc2_w, h,
                                                          mean, rstd, z1, g)
    grads = [t.to(dt) for t, dt in zip((dlnw, dlnb, dw1, db1, dw2, db2), ctx.dtypes)]
    return (dx, None, None, None, *grads, None, None)


_move_ffn_fwd_op.register_autograd(_backward, setup_context=_setup)

def resolve_compute_dtype(x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The GEMM operand dtype: ``compute_dtype``, else the autocast dtype when autocast is on, else x.dtype."""
    if compute_dtype is None:
        dev = x.device.type
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return check_compute_dtype(compute_dtype, "kernels/move_ffn.py", none_ok=False)


def move_ffn(x, view_id, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_eps: float = 1e-6,
             routing: Optional[MoveRouting] = None, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """MoVE FFN with residual over a packed token buffer.

    Args:
        x: (N, D) tokens, any order.
        view_id: (N,) int, 0 = frontal (incl. CLS), 1 = lateral.
        ln_w, ln_b: (2, D) per-expert LayerNorm; fc1_w (2, H, D), fc1_b (2, H), fc2_w (2, D, H), fc2_b (2, D).
        ln_eps: LayerNorm epsilon (1e-6 in Med-ST's ViT).
        routing: :func:`build_routing(view_id)`, built once per forward and shared by the blocks; built here
            when omitted (Triton path only).
        compute_dtype: dtype of the GEMM operands (fp32 accumulation). None: the autocast dtype when autocast
            is on for x's device, else x.dtype. With an fp32 x and bf16 compute (autocast), LayerNorm, the
            residual and the output stay fp32, the FFN branch is rounded to bf16 before the residual add (as
            the eager module under autocast), and every gradient has its parameter's dtype.

    Returns:
        (N, D) ``x + FFN_view(LN_view(x))`` with exact GELU, dtype of x.
    """
    if x.dim() != 2 or ln_w.shape != (N_EXPERTS, x.shape[1]) or fc1_w.dim() != 3 or fc1_w.shape[2] != x.shape[1]:
        raise ValueError(f"kernels/move_ffn.py: expected x (N, D), ln_w ({N_EXPERTS}, D), fc1_w ({N_EXPERTS}, H, D); "
                         f"got x {tuple(x.shape)}, ln_w {tuple(ln_w.shape)}, fc1_w {tuple(fc1_w.shape)}")
    ct = resolve_compute_dtype(x, compute_dtype)
    if not use_triton(x):
        # the eager maths, under autocast when the compute dtype asks for it
        with torch.autocast(x.device.type, dtype=ct, enabled=ct not in (x.dtype, torch.float32)):
            return move_ffn_ref(x, view_id, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_eps)
    if routing is None:
        routing = build_routing(view_id)
    args = [t.contiguous() for t in (x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)]
    return _move_ffn_fwd_op(args[0], routing.rows, routing.tile_expert, routing.seg, *args[1:], float(ln_eps),
                            ct)[0]


def move_ffn_slots(x, routing: MoveRouting, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, ln_eps: float = 1e-6,
                   compute_dtype: Optional[torch.dtype] = None):
    """The custom op itself (Triton or its PyTorch slot-layout twin): for tests and torch.compile checks."""
    return _move_ffn_fwd_op(x, routing.rows, routing.tile_expert, routing.seg, ln_w, ln_b, fc1_w, fc1_b, fc2_w,
                            fc2_b, float(ln_eps), resolve_compute_dtype(x, compute_dtype))[0]
