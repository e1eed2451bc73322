"""Triton kernels for one-token latent attention (split-K, flash-decoding style).

Imported on first use only: triton is an optional dependency. Whether these run compiled (GPU)
or interpreted (``TRITON_INTERPRET=1`` set before triton is imported; CPU tensors) is decided by
triton when this module is imported; ``INTERPRETED`` records which.

Letters: B batch, H query heads, Hkv kv heads, T cache positions, C latent width, R rotated values
of the kept rope slots (one rope key per position, shared by every head). One program of ``_split_kernel`` owns (a block of BLOCK_H query heads,
one C_CHUNK-wide slice of the output, one T-chunk of one sequence):

    for each BLOCK_T tile of its T-chunk:
        s   = q_latent[h, :]·latent[t, :]               (tl.dot over C, C_CHUNK at a time)
              [+ q_bias[h]] [· key_scale[kv(h), t]]
              + q_rope[h, :]·rope_key[t, :]             (one tl.dot: the rope keys are shared)
        s   = softcap(s·scale) + additive mask, −inf outside the valid range / bool mask
        online softmax (base 2) → acc[h, slice] += p · latent[t, slice]

The latent tile is shared by every query head, so a program covering all heads loads it once
(MQA-like reuse, which keeps the kernel memory-bound); so is the [BLOCK_T, RSPAN] rope-key tile,
one more tl.dot. Partial results (running max, sum, unnormalised acc) go to
a workspace that ``_combine_kernel`` reduces; with one split the first kernel writes the output.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # DOT_FP32 (interpreter only): its tl.dot reads bf16 as raw uint16 (triton 3.9). Upcasting first
    # is the same math as a GPU bf16/fp16 dot with fp32 accumulation: the products are exact in fp32.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _split_kernel(
        Q, QR, LAT, RK, KVMAP, START, END, MASK, QB, KS,
        ACC, MAX, SUM, OUT,
        H, C, R, T, scale, softcap,
        s_qb, s_qh, s_qc, s_qrb, s_qrh, s_qrr,
        s_lb, s_lt, s_lc, s_rb, s_rt, s_rr,
        s_mb, s_mt, s_qbb, s_qbh, s_kb, s_kj, s_kt,
        s_ab, s_as, s_ah, s_ac, s_ob, s_oh, s_oc,
        NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
        C_CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, RSPAN: tl.constexpr,
        HAS_START: tl.constexpr, HAS_END: tl.constexpr,
        HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_QB: tl.constexpr, HAS_KS: tl.constexpr,
        SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    pid_hc = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hb = pid_hc // N_CHUNKS
    ct = pid_hc % N_CHUNKS
    lat_ty = LAT.dtype.element_ty

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    kvh = tl.load(KVMAP + offs_h, mask=hmask, other=0)

    # this program's share of the valid range [start, end) of sequence b, in whole BLOCK_T tiles
    start = 0
    end = T
    if HAS_START:
        start = tl.load(START + b)
    if HAS_END:
        end = tl.minimum(tl.load(END + b), T)
    per_split = tl.cdiv(tl.cdiv(tl.maximum(end - start, 0), NUM_SPLITS), BLOCK_T) * BLOCK_T
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)

    offs_o = ct * C_CHUNK + tl.arange(0, C_CHUNK)
    omask = offs_o < C
    if N_CHUNKS == 1:   # the whole query fits one tile: load it once
        q_all = tl.load(Q + b * s_qb + offs_h[:, None] * s_qh + offs_o[None, :] * s_qc,
                        mask=hmask[:, None] & omask[None, :], other=0.0).to(lat_ty)
    if RSPAN > 0:       # the rope query over the shared rope keys' R columns (RSPAN: R padded to a power of 2)
        col_r = tl.arange(0, RSPAN)
        col_ok = col_r < R
        q_rope = tl.load(QR + b * s_qrb + offs_h[:, None] * s_qrh + col_r[None, :] * s_qrr,
                         mask=hmask[:, None] & col_ok[None, :], other=0.0).to(lat_ty)
    if HAS_QB:
        q_bias = tl.load(QB + b * s_qbb + offs_h * s_qbh, mask=hmask, other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, C_CHUNK], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < hi
        valid = tmask
        if HAS_MASK:
            mk = tl.load(MASK + b * s_mb + offs_t * s_mt, mask=tmask, other=0)
            if MASK_BOOL:
                valid = valid & (mk != 0)
        if N_CHUNKS == 1:
            lat = tl.load(LAT + b * s_lb + offs_t[:, None] * s_lt + offs_o[None, :] * s_lc,
                          mask=tmask[:, None] & omask[None, :], other=0.0)
            s = _dot(q_all, tl.trans(lat), DOT_FP32, PRECISION)
        else:
            s = tl.zeros([BLOCK_H, BLOCK_T], tl.float32)
            for ci in tl.static_range(N_CHUNKS):
                offs_c = ci * C_CHUNK + tl.arange(0, C_CHUNK)
                cmask = offs_c < C
                q_c = tl.load(Q + b * s_qb + offs_h[:, None] * s_qh + offs_c[None, :] * s_qc,
                              mask=hmask[:, None] & cmask[None, :], other=0.0).to(lat_ty)
                lat_c = tl.load(LAT + b * s_lb + offs_t[:, None] * s_lt + offs_c[None, :] * s_lc,
                                mask=tmask[:, None] & cmask[None, :], other=0.0)
                s += _dot(q_c, tl.trans(lat_c), DOT_FP32, PRECISION)
            lat = tl.load(LAT + b * s_lb + offs_t[:, None] * s_lt + offs_o[None, :] * s_lc,
                          mask=tmask[:, None] & omask[None, :], other=0.0)
        if HAS_QB:
            s += q_bias[:, None]
        if HAS_KS:
            ks = tl.load(KS + b * s_kb + kvh[:, None] * s_kj + offs_t[None, :] * s_kt,
                         mask=hmask[:, None] & tmask[None, :], other=0.0)
            s = s * ks.to(tl.float32)
        if RSPAN > 0:
            rk = tl.load(RK + b * s_rb + offs_t[:, None] * s_rt + col_r[None, :] * s_rr,
                         mask=tmask[:, None] & col_ok[None, :], other=0.0)
            s += _dot(q_rope, tl.trans(rk), DOT_FP32, PRECISION)
        s = s * scale
        if SOFTCAP:     # softcap·tanh(s/softcap), tanh(x) = 2σ(2x) − 1
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        if HAS_MASK:
            if not MASK_BOOL:
                s += mk.to(tl.float32)[None, :]
        s = tl.where(valid[None, :], s * 1.4426950408889634, float("-inf"))   # log2(e): base-2 softmax
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)    # rows with nothing to attend yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(lat_ty), lat, DOT_FP32, PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:     # nothing to combine: normalise here (0/0 = NaN when nothing was valid)
        out = acc / l_i[:, None]
        tl.store(OUT + b * s_ob + offs_h[:, None] * s_oh + offs_o[None, :] * s_oc,
                 out.to(OUT.dtype.element_ty), mask=hmask[:, None] & omask[None, :])
    else:
        tl.store(ACC + b * s_ab + split * s_as + offs_h[:, None] * s_ah + offs_o[None, :] * s_ac,
                 acc, mask=hmask[:, None] & omask[None, :])
        if ct == 0:
            row = (b * NUM_SPLITS + split) * H + offs_h
            tl.store(MAX + row, m_i, mask=hmask)
            tl.store(SUM + row, l_i, mask=hmask)


@triton.jit
def _combine_kernel(ACC, MAX, SUM, OUT, H, C,
                    s_ab, s_as, s_ah, s_ac, s_ob, s_oh, s_oc,
                    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    cb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    smask = offs_s < NUM_SPLITS
    row = (b * NUM_SPLITS + offs_s) * H + h
    m = tl.load(MAX + row, mask=smask, other=float("-inf"))
    l = tl.load(SUM + row, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)     # 0 for empty splits (m = −inf)
    denom = tl.sum(w * l, axis=0)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    acc = tl.load(ACC + b * s_ab + offs_s[:, None] * s_as + h * s_ah + offs_c[None, :] * s_ac,
                  mask=smask[:, None] & cmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / denom
    tl.store(OUT + b * s_ob + h * s_oh + offs_c * s_oc, out.to(OUT.dtype.element_ty), mask=cmask)


INTERPRETED = isinstance(_split_kernel, InterpretedFunction)
