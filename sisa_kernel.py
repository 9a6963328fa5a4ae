"""
SISA attention as one fused Triton kernel: exact at any decay, no clamp, no chunks.

sisa.py's `sisa_attention` is the reference: one SDPA call on [q ; s Cbar], [k ; s Bbar]
with a single offset c. That offset must keep exp(g_i - c) and exp(c - g_j) inside the
dtype, which holds about 80 nats; trained heads forget thousands of nats over a block of
2048, and then the SDPA form has to split the queries into many chunks. This kernel
walks key tiles like flash attention and picks an offset per pair of tiles, so every
exponential it takes is at most 1 (read with sisa.py's docstring: same names):

    score_ij = scale q_i . k_j + exp(g_i - g_j) C_i . B_j        (j <= i)

with C_i = lambda R(Phi_i) C_i and B_j = R(Phi_j) B_j already rotated, g the cumulative
log decay (non-increasing) and scale = 1 / sqrt(d_h).

The sequence is cut into blocks of BLOCK (64) tokens.
- A key in an earlier block than the query (every j < every i): take c0 = g at the first row
  i0 of the query's block. Then exp(g_i - c0) <= 1 for i >= i0 and exp(c0 - g_j) <= 1 for j < i0,
  and exp(g_i - g_j) = exp(g_i - c0) exp(c0 - g_j) is a product of two numbers <= 1: the
  importance is one more matrix product, [q ; C exp(g - c0)] . [k ; B exp(c0 - g)]. A factor
  that underflows to 0 had a true weight below exp(-87): 0 is the right answer in fp32.
- A key in the query's own block: exp(g_i - g_j) for j <= i, computed pairwise, at most 1.
- A key block the queries have forgotten: exp(c0 - g_j) < 2^-126 at its last key, so every factor
  there is 0 in fp32. The kernels find those blocks from g (_forgotten) and skip the importance's
  dots for them: the score is q.k alone. Heads that forget fast (a half-life of a few tokens, as
  trained heads have) remember a few blocks back, and most key tiles of a long block cost q.k only.

The backward pass is flash attention's, with the same cases. The gradient of g needs no
extra pass: score_ij depends on g_i and -g_j through the same term W_ij = exp(g_i - g_j) C_i.B_j,
so dL/dg_t = sum_j dS_tj W_tj - sum_i dS_it W_it. The two sums nearly cancel where heads
remember long (each pair (i, j) with t on neither side of it adds to both), so each kernel
sums its side from the exact rounded products the scores used, and all three kernels take
the same offset for a pair: then the pairs cancel to fp32 rounding. (Offsets picked per tile,
different in each kernel, left 16-bit rounding in every pair: docs/performance.md.) For the same
reason delta_i = o_i . do_i, which every dS_ij of row i takes, is read off o as the forward computed
it, in fp32: with 16-bit inputs the forward stores o and, beside it, what rounding o to 16 bits left out.

Attention dropout is SDPA's: P = softmax(scores) over all the keys, then each P_ij is kept with
probability 1 - p and scaled by 1 / (1 - p); Z_ij is that factor, 0 or 1 / (1 - p). The forward pass
sums every weight into the softmax's denominator and only the kept ones into o, so the saved
log-sum-exp is the softmax's. The backward pass is flash attention 2's: dV_j = sum_i P_ij Z_ij dO_i,
dP_ij = Z_ij dO_i . V_j and dS_ij = P_ij (dP_ij - delta_i), delta_i = o_i . do_i of the dropped o;
dS feeds dq, dk and the importance's gradients as without dropout. The backward kernels take
P_ij / (1 - p) from the exponent (the log-sum-exp plus log2(1 - p), a row's add) and delta_i (1 - p):
dS_ij = P_ij / (1 - p) (dP'_ij - (1 - p) delta_i), dP'_ij = dO_i . V_j where kept and 0 where not, so Z
costs a select a weight and no multiplication. A small kernel draws the mask
once a call (_dropout_bits) from Philox (tl.randint4x, eight 16-bit draws a call), keyed by a seed
tensor and the (batch, head), at a counter from the pair's 16 x 16 group, and stores it as bits: a
byte for the eight weights one thread of a tensor-core tile holds, l^2 / 8 bytes a head. The three
attention kernels read it (_kept): Philox drawn inside each of them was slower, and filled registers
the tiles need (docs/performance.md). Without dropout the flag DROPOUT compiles none of this.

`sisa_attention_fused` is what sisa.py calls on CUDA; the tests hold it equal to the SDPA form
and to an fp64 evaluation of the score (on the CPU under TRITON_INTERPRET=1). `channels` gives
it g, R(Phi) C and R(Phi) B: sisa.py's `ssm_channels` (two scans and a rotation) fused, tested
against it in fp64. `cumsum` is torch.cumsum as one Triton scan, for the paper-offset path.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.nn import functional as F


def sisa_attention_fused(q, k, v, g, RC, RB, lam, dropout_p=0.0):
    """softmax(q.k / sqrt(d_h) + lambda exp(g_i - g_j) RC_i . RB_j + causal mask) v in one kernel.

    Args:
        q, k, v: (b, h, l, d_h), RoPE applied; fp32, bf16 or fp16, on CUDA (or on the CPU
            under TRITON_INTERPRET=1)
        g: (b, h, l), the cumulative log decay
        RC, RB: (b, h, l, d_s), R(Phi) C and R(Phi) B (g, RC, RB: as sisa.ssm_channels returns them)
        lam: (h,), lambda
        dropout_p: attention dropout as SDPA's: each weight of the softmax kept with probability
            1 - dropout_p and then scaled by 1 / (1 - dropout_p), the mask drawn from torch's generator
    Returns:
        (b, h, l, d_h)
    """
    d_h, l = q.size(-1), q.size(-2)
    if dropout_p > 0 and l * l > 2**31:
        raise ValueError(f'dropout in the fused kernel counts the pairs (i, j) in int32: l <= 46340, got {l}')
    seed = dropout_seed(q.device) if dropout_p > 0 else None
    q, k, v = (_pad_to_pow2(t) for t in (q, k, v))
    RC, RB = (_pad_to_pow2(t.float()).contiguous() for t in (RC, RB))  # fp32: see _launch
    o, _, _, _ = _attention(q, k, v, RC, RB, g.float().contiguous(), lam.float().contiguous(), seed,
                            1.0 / math.sqrt(d_h), dropout_p)
    return o[..., :d_h]


def dropout_seed(device):
    """The seed of one call's dropout mask, from torch's generator on device. A tensor, which the kernels
    load: a compiled step draws it inside its graph, with no sync and no recompile for a new seed."""
    return torch.randint(2**31 - 1, (1,), device=device)


def dropout_mask(seed, b, h, l, dropout_p):
    """The keep mask that the attention kernels read for (b, h, l, .) inputs and this seed: (b, h, l, l) bool,
    the causal mask not applied. For the tests, which hold the kernel to a reference with this very mask:
    the bits as the kernels store them (_dropout_bits), unpacked here as _kept does, written once more."""
    bits = _draw_bits(seed, b, h, l, dropout_p, 64, causal=False).view(b, h, -1, 64 * _cdiv(l, 64) // 4)
    i = j = torch.arange(l, device=seed.device)
    byte = bits[:, :, (i // 16 * 8 + i % 8)[:, None], (j // 16 * 4 + j % 8 // 2)[None, :]].int()
    return ((byte >> (4 * (i // 8 % 2)[:, None] + (2 * (j // 8 % 2) + j % 2)[None, :])) & 1).bool()


def _mask_bytes(l, block):
    """Bytes of a (batch, head)'s stored dropout bits, as _mask_size: (l / 2) x (l / 4), l padded to block."""
    padded = _cdiv(l, block) * block
    return (padded // 2) * (padded // 4)


def _draw_bits(seed, b, h, l, dropout_p, block, causal=True):
    """The stored dropout mask (_dropout_bits): (b h, bytes), a bit a weight."""
    bits = torch.empty(b * h, _mask_bytes(l, block), dtype=torch.uint8, device=seed.device)
    tiles = _cdiv(l, block)
    _dropout_bits[(tiles, tiles, b * h)](seed, bits, l, dropout_p, BLOCK=block, CAUSAL=causal)
    return bits


def channels(C, B, log_alpha, theta):
    """sisa.ssm_channels in one fused kernel (and two for its backward pass).

    Args:
        C, B: (b, h, l, d_s), any strides (views of the SSM projection), any float dtype
        log_alpha: (b, h, l); theta: (b, h, l, d_s // 2)
    Returns:
        g: (b, h, l); RC, RB: (b, h, l, d_s), R(Phi) C and R(Phi) B; all fp32 and contiguous
    """
    g, RC, RB, _ = _channels(C, B, log_alpha, theta)  # the fourth, Phi, is kept for the backward pass
    return g, RC, RB


def cumsum(x, dim, reverse=False):
    """torch.cumsum(x, dim) (reverse: from the end), contiguous, as a Triton scan that reads x in its
    own layout: theta is a view of the SSM projection, its axis of time not last, where torch.cumsum
    needs a copy (and a flip each way for the backward pass's reverse scan). One custom op, which
    torch.compile does not look into: inductor (torch 2.11) failed to generate code for g's cumsum
    once the whole model step was one graph ("SplitScan")."""
    return _cumsum_op(x, dim, reverse)


# -----------------------------------------------------------------------------
# The kernels, in the order they appear below.
#
# attention, sisa_attention_fused (score_ij above; blocks of BLOCK rows decide each pair's offset)
#   _forward             o and each row's log-sum-exp: an online softmax over key tiles (_forward_step)
#   _backward_dq         dq, dL/dRC, the query side of dL/dg and dL/dlambda per query tile (_dq_step)
#   _backward_dkdv       dk, dv, dL/dRB, dL/dg = query side - key side (_dkdv_step)
#   shared helpers       _scores: score_ij of a tile; _channel, _decayed, _rounded: C and B tiles as the
#                        dots read them; _forgotten, _remembered_keys, _remembered_queries: the key
#                        blocks whose importance is 0 in fp32; _kept: a tile's dropout mask, from the stored bits
#   _dropout_bits        the dropout mask, drawn once a call into bits (_dropout_key, _draw)
# channels, sisa.ssm_channels
#   _channels_forward    g = cumsum log_alpha, Phi = cumsum theta, then R(Phi) C and R(Phi) B
#   _channels_backward   dL/dC, dL/dB through R(Phi)^T, and dL/dPhi
#   _channels_scan_back  dL/dlog_alpha, dL/dtheta: the two sums from the end
# cumsum
#   _cumsum              torch.cumsum along any axis of any strides, either way


# -----------------------------------------------------------------------------
# Launch configuration: the tables, and launch_config, the one place that picks from them.

# The attention kernels on Ampere and newer: tiles, warps and pipeline stages, chosen by timing
# (docs/performance.md). BLOCK is the length of the blocks that decide each pair's offset: the
# same in all three kernels, and every tile divides it.
CONFIG = dict(BLOCK=64, forward=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
              dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
              dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))
# GPUs before Ampere (compute capability 7.x: Volta, Turing, as in a T4) have less shared memory a
# block than CONFIG's tiles need, and no asynchronous copies to pipeline. The tests compile these
# for sm_75.
SMALL = dict(BLOCK=64, forward=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
             dkdv=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
             dq=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1))
# Wider C and B tiles (d_state 32 and 64, fp32: see _launch) fill registers and shared memory
# sooner, so fewer stages run faster (docs/performance.md). CONFIG's stages by d_state padded to a
# power of two (wider than 64 takes 64's); the tiles stay CONFIG's.
WIDE = {32: dict(dkdv=dict(num_stages=1)),
        64: dict(forward=dict(num_stages=1), dq=dict(num_stages=1), dkdv=dict(num_stages=1))}
# Sequences of at most SHORT['length'] tokens (the tiny shapes): dk dv faster at 1 stage, at 2048 tokens
# slower (docs/performance.md).
SHORT = dict(length=1024, dkdv=dict(num_stages=1))
# Under Triton's interpreter (the CPU tests, at about 70 tokens): small tiles of different sizes,
# so that a short sequence crosses blocks and tiles.
INTERPRETED = dict(BLOCK=32, forward=dict(BLOCK_M=16, BLOCK_N=32), dkdv=dict(BLOCK_M=32, BLOCK_N=16),
                   dq=dict(BLOCK_M=32, BLOCK_N=16))
# The scans on CUDA: rows per program (CHUNK) and rows per load of the loop that sums the chunks
# before (CARRY), chosen by timing each kernel alone (docs/performance.md). Under the interpreter
# SCANS_INTERPRETED's, small so that the tests cross chunks and carry loads, and with loads longer than
# a chunk, as on CUDA, so that a load reaches past the rows it sums and its mask counts.
SCANS = dict(channels_forward=dict(CHUNK=128, CARRY=512), channels_backward=dict(CHUNK=64),
             channels_scan_back=dict(CHUNK=256, CARRY=512), cumsum=dict(CHUNK=256))
SCANS_INTERPRETED = dict(CHUNK=16, CARRY=32)


def launch_config(kernel, device, d_state=None, length=0):
    """The meta-parameters of `kernel` on `device`. An attention kernel ('forward', 'dq', 'dkdv')
    gets BLOCK, its tiles, warps and stages for C and B tiles d_state wide; a scan (a key of SCANS)
    its CHUNK and CARRY. The tables are read at each call, so that tests can swap them. Under the
    interpreter, whose time goes by programs, sequences longer than 128 (a scan: 64) get tiles and
    chunks 2x larger per doubling: still several to a sequence."""
    on_cuda = torch.device(device).type == 'cuda'
    grow = 1 if on_cuda else max(1, _next_pow2(max(length, 1)) // (64 if kernel in SCANS else 128))
    if kernel in SCANS:
        return dict(SCANS[kernel]) if on_cuda else {name: SCANS_INTERPRETED[name] * grow for name in SCANS[kernel]}
    if not on_cuda:
        tile = lambda key, n: n * grow if key.startswith('BLOCK') else n
        config = {key: {k: tile(k, n) for k, n in v.items()} if isinstance(v, dict) else tile(key, v)
                  for key, v in INTERPRETED.items()}
    else:
        config = CONFIG if torch.cuda.get_device_capability(device) >= (8, 0) else SMALL
    wide = WIDE.get(min(d_state, 64), {}).get(kernel, {}) if config is CONFIG else {}
    short = SHORT.get(kernel, {}) if config is CONFIG and length <= SHORT['length'] else {}
    meta = {**config[kernel], **short, **wide, 'BLOCK': config['BLOCK']}  # later tables win
    assert all(meta['BLOCK'] % meta[tile] == 0 for tile in ('BLOCK_M', 'BLOCK_N')), 'tiles must divide BLOCK'
    return meta


# -----------------------------------------------------------------------------
# Attention: helpers shared by the three kernels

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)): exp2 is the hardware instruction
FORGOTTEN = tl.constexpr(-126.0)  # log2 of fp32's smallest normal number


@triton.jit
def _score_dot(c_tile, b_tile, acc, PRECISION: tl.constexpr):
    """acc + c_tile . b_tile^T, the importance's dot: in fp16 beside q.k's 16-bit operands (the tiles hold fp16's
    values, _rounded), in fp32 for 'ieee'."""
    if PRECISION == 'tf32':
        return tl.dot(c_tile.to(tl.float16), tl.trans(b_tile.to(tl.float16)), acc)
    return tl.dot(c_tile, tl.trans(b_tile), acc, input_precision=PRECISION)


@triton.jit
def _scores(q, k, c_tile, b_tile, g_q, g_k, scale, i, j, L, DIAGONAL: tl.constexpr, IMPORTANCE: tl.constexpr,
            PRECISION: tl.constexpr):
    """score_ij in log2 units for a (rows, cols) tile, -inf where masked.

    Off the diagonal, c_tile and b_tile arrive already multiplied by exp(g_i - c0) / scale and
    exp(c0 - g_j) (both factors <= 1), so the importance shares q.k's accumulator.
    Without IMPORTANCE (a forgotten key block, see _remembered_keys) the score is q.k alone."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if not IMPORTANCE:
        s = s * (scale * LOG2E)
    elif DIAGONAL:
        decay = tl.exp2(tl.minimum(g_q[:, None] - g_k[None, :], 0.0) * LOG2E)
        imp = _score_dot(c_tile, b_tile, tl.zeros_like(s), PRECISION) * decay
        s = (s * scale + imp) * LOG2E
        keep = (j[None, :] <= i[:, None]) & (j[None, :] < L) & (i[:, None] < L)
        s = tl.where(keep, s, float('-inf'))
    else:  # every key is before every query and inside the sequence: nothing to mask
        s = _score_dot(c_tile, b_tile, s, PRECISION) * (scale * LOG2E)
    return s


@triton.jit
def _rows(X, rows, L, stride_row, D: tl.constexpr):
    """Load rows of a (l, D) slab (zeros past L)."""
    return tl.load(X + rows[:, None] * stride_row + tl.arange(0, D)[None, :], mask=rows[:, None] < L, other=0.0)


@triton.jit
def _channel(X, rows, L, factor, DS: tl.constexpr, PRECISION: tl.constexpr):
    """Rows of R(Phi) C or R(Phi) B times factor (lambda for C, 1 for B), rounded as the dots read them."""
    return _rounded(_rows(X, rows, L, DS, DS) * factor, PRECISION=PRECISION)


@triton.jit
def _rounded(x, PRECISION: tl.constexpr):
    """x rounded to fp16's values (a no-op for 'ieee'): the scores' C.B dots read them in fp16, dC's and dB's
    in tf32, which holds them exactly. The gradient of g sums C_i . dC_i and B_j . dB_j from these very
    values, so both sides of a pair see what the dots saw."""
    if PRECISION == 'tf32':
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _decayed(x, g_late, g_early, post, PRECISION: tl.constexpr):
    """x * exp(g_late - g_early) * post, rows of x scaled: the decay from an earlier row to a later
    one, at most 1 (the exponent is capped at 0)."""
    return _rounded(x * (tl.exp2(tl.minimum(g_late - g_early, 0.0) * LOG2E) * post)[:, None], PRECISION=PRECISION)


@triton.jit
def _forgotten(c0, g_end):
    """Whether queries whose offset is c0 (g at their block's first row) have forgotten every key of an
    earlier block whose last row has g_end: exp(c0 - g_j) < 2^-126, fp32's smallest normal number, at
    the block's last key, so at all of its keys (g does not increase). Every factor the importance
    would take there is 0 in fp32, and the kernels skip its dots: the scores are q.k alone. All three
    kernels decide a pair of blocks from the same two values of g, so they skip the same pairs."""
    return (c0 - g_end) * LOG2E < FORGOTTEN


@triton.jit
def _remembered_keys(G, block_start, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    """The first key row after the key blocks that the queries of the block starting at block_start have
    forgotten: a multiple of BLOCK, at most block_start. Heads that forget fast remember a few blocks back."""
    kb = tl.arange(0, BLOCKS)
    earlier = kb * BLOCK < block_start
    g_end = tl.load(G + kb * BLOCK + BLOCK - 1, mask=earlier, other=0.0)
    remembered = earlier & ~_forgotten(tl.load(G + block_start), g_end)
    return tl.min(tl.where(remembered, kb, block_start // BLOCK)) * BLOCK


@triton.jit
def _remembered_queries(G, block_end, L, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    """The end of the query blocks after block_end that remember the key block ending there: a multiple
    of BLOCK, at least block_end. The same pairs of blocks as _remembered_keys, seen from the keys."""
    qb = tl.arange(0, BLOCKS)
    later = (qb * BLOCK >= block_end) & (qb * BLOCK < L)
    c0 = tl.load(G + qb * BLOCK, mask=later, other=0.0)
    remembered = later & ~_forgotten(c0, tl.load(G + tl.minimum(block_end, L) - 1))
    return tl.max(tl.where(remembered, qb + 1, block_end // BLOCK)) * BLOCK


@triton.jit
def _dropout_key(SEED, bh):
    """Philox's 64-bit key for one (batch, head)'s dropout mask: the call's seed (31 bits) in the high
    word, bh in the low one, so that every head of every seed draws its own stream."""
    return (tl.load(SEED).to(tl.int64) << 32) + bh


@triton.jit
def _draw(key, i, j, L, dropout_p):
    """The dropout bits of a (rows, cols) tile from Philox: (rows / 2, cols / 4) int32s of eight bits, a bit
    set where the weight is kept (probability 1 - dropout_p to 2^-17: the draws have 16 bits, flash
    attention's have 8). One Philox call gives four 32-bit words, eight 16-bit draws, for the eight weights
    one thread holds of a tensor-core tile's 16 x 16 group: rows r and r + 8, keys 2c, 2c + 1, 2c + 8 and
    2c + 9 (_kept). So each thread draws its own weights and no draw moves between threads (a shuffle
    through shared memory per tile otherwise). i and j start at multiples of 16 (every tile does); the
    counters stay below 2^31 (sisa_attention_fused checks l)."""
    rows, cols = _mask_rows_cols(i, j)
    r0, r1, r2, r3 = tl.randint4x(key, rows[:, None] * ((L + 15) // 16 * 4) + cols[None, :])
    low = tl.cast(dropout_p * 65536.0 + 0.5, tl.uint32)  # a draw below it is dropped
    return (((r0 & 0xFFFF) >= low).to(tl.int32) | (((r1 & 0xFFFF) >= low).to(tl.int32) << 1)
            | (((r2 & 0xFFFF) >= low).to(tl.int32) << 2) | (((r3 & 0xFFFF) >= low).to(tl.int32) << 3)
            | (((r0 >> 16) >= low).to(tl.int32) << 4) | (((r1 >> 16) >= low).to(tl.int32) << 5)
            | (((r2 >> 16) >= low).to(tl.int32) << 6) | (((r3 >> 16) >= low).to(tl.int32) << 7))


@triton.jit
def _mask_rows_cols(i, j):
    """Where a (rows, cols) tile's dropout bits sit: the Philox counter's row and column, and the stored
    mask's, of each group of eight weights that one call draws."""
    # row (i // 16) * 8 + i % 8: rows r and r + 8 share a call; column (j // 16) * 4 + (j % 8) // 2: keys 2c,
    # 2c + 1, 2c + 8 and 2c + 9 share one
    rows = tl.min(i, 0) // 2 + tl.arange(0, i.shape[0] // 2)
    cols = tl.min(j, 0) // 4 + tl.arange(0, j.shape[0] // 4)
    return rows, cols


@triton.jit
def _mask_size(L, BLOCK: tl.constexpr):
    """Bytes of one (batch, head)'s stored dropout bits: (l / 2) x (l / 4), l padded to a multiple of BLOCK."""
    return (L + BLOCK - 1) // BLOCK * (BLOCK // 2) * ((L + BLOCK - 1) // BLOCK * (BLOCK // 4))


@triton.jit
def _mask_tile(MASK, i, j, L, BLOCK: tl.constexpr):
    """Pointers to a (rows, cols) tile's dropout bits in one (batch, head)'s stored mask: a byte for each
    call's eight weights, rows of l / 4 bytes with l padded to a multiple of BLOCK, so every tile is inside."""
    rows, cols = _mask_rows_cols(i, j)
    return MASK + rows[:, None] * ((L + BLOCK - 1) // BLOCK * (BLOCK // 4)) + cols[None, :]


@triton.jit
def _kept(MASK, i, j, L, BLOCK: tl.constexpr):
    """Which weights of a (rows, cols) tile dropout keeps, from the stored bits (_dropout_bits): byte (8 A + r,
    4 a + c) holds weights i = 16 A + 8 h + r, j = 16 a + 8 n + 2 c + e in bit 4 h + 2 n + e. Each byte is split
    into its eight bits, which a reshape and a permutation carry to their weights: written so, the compiler moves
    the tile's bytes between threads (rows / 2 x cols / 4) and lays the bits out as the scores are, where
    testing a bit of the widened bytes moved the whole rows x cols mask (docs/performance.md)."""
    M: tl.constexpr = i.shape[0]
    N: tl.constexpr = j.shape[0]
    bits = tl.load(_mask_tile(MASK, i, j, L, BLOCK)).to(tl.int32)             # (A r, a c)
    each = (bits[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1          # (A r, a c, h n e)
    each = tl.permute(tl.reshape(each, (M // 16, 8, N // 16, 4, 2, 2, 2)), (0, 4, 1, 2, 5, 3, 6))  # A h r a n c e
    return tl.reshape(each, (M, N)) != 0


# -----------------------------------------------------------------------------
# forward: one program per (batch x head, query tile); online softmax over key tiles

@triton.jit
def _forward_step(acc, m_i, l_i, q, c_tile, K, V, B, G, stride_kl, stride_vl, g_q, c0, scale, i, n0, L, MASK,
                  dropout_p, DH: tl.constexpr, DS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                  DIAGONAL: tl.constexpr, IMPORTANCE: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    j = n0 + tl.arange(0, BLOCK_N)
    k, v = _rows(K, j, L, stride_kl, DH), _rows(V, j, L, stride_vl, DH)
    b_tile, g_k = k, g_q  # unused without the importance
    if IMPORTANCE:
        b_tile, g_k = _channel(B, j, L, 1.0, DS, PRECISION=PRECISION), tl.load(G + j, mask=j < L, other=0.0)
        if not DIAGONAL:
            b_tile = _decayed(b_tile, c0, g_k, 1.0, PRECISION=PRECISION)  # exp(c0 - g_j) <= 1
    s = _scores(q, k, c_tile, b_tile, g_q, g_k, scale, i, j, L, DIAGONAL=DIAGONAL, IMPORTANCE=IMPORTANCE,
                PRECISION=PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows past L see only -inf
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:  # the denominator above sums every weight, o only the kept ones
        p = tl.where(_kept(MASK, i, j, L, BLOCK), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _forward(Q, K, V, C, B, G, LAM, MASK, O, OL, LSE, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
             stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol, H, L, scale, dropout_p,
             DH: tl.constexpr, DS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCKS: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """BLOCK_M queries of one (batch, head). C, B, G, LSE are contiguous; C is R(Phi) C, lambda applied here.
    OL (contiguous, as q; 16-bit inputs only) takes what rounding o to 16 bits left out (_backward_dq).
    BLOCK_M and BLOCK_N divide BLOCK, the length of the blocks that decide each pair's offset;
    BLOCKS is a power of two, at least the number of blocks in L. MASK: DROPOUT's bits (_dropout_bits)."""
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # longest rows first (_launch)
    bh = tl.program_id(0)
    z, h = bh // H, bh % H
    Q, K, V = Q + z * stride_qb + h * stride_qh, K + z * stride_kb + h * stride_kh, V + z * stride_vb + h * stride_vh
    O = O + z * stride_ob + h * stride_oh
    C, B, G, LSE = C + bh * L * DS, B + bh * L * DS, G + bh * L, LSE + bh * L
    if DROPOUT:  # this head's dropout bits
        MASK += bh.to(tl.int64) * _mask_size(L, BLOCK)
    block_start = m0 - m0 % BLOCK          # the first row of the queries' block
    n1 = _remembered_keys(G, block_start, BLOCK, BLOCKS)
    i = m0 + tl.arange(0, BLOCK_M)
    q, c_tile = _rows(Q, i, L, stride_ql, DH), _channel(C, i, L, tl.load(LAM + h), DS, PRECISION=PRECISION)
    g_q = tl.load(G + i, mask=i < L, other=float('-inf'))
    c0 = tl.load(G + block_start)          # the offset for every key before that block
    # exp(g_i - c0) <= 1; 1 / scale: the importance shares q.k's accumulator
    c_off = _decayed(c_tile, g_q, c0, 1 / scale, PRECISION=PRECISION)

    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, DH], tl.float32)
    for n0 in range(block_start, m0 + BLOCK_M, BLOCK_N):  # key tiles in the queries' block (pairwise)
        acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, c_tile, K, V, B, G, stride_kl, stride_vl, g_q, c0, scale,
                                      i, n0, L, MASK, dropout_p, DH, DS, BLOCK, BLOCK_N, DIAGONAL=True,
                                      IMPORTANCE=True, PRECISION=PRECISION, DROPOUT=DROPOUT)
    for n0 in range(n1, block_start, BLOCK_N):           # key tiles in earlier blocks
        acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, c_off, K, V, B, G, stride_kl, stride_vl, g_q, c0, scale,
                                      i, n0, L, MASK, dropout_p, DH, DS, BLOCK, BLOCK_N, DIAGONAL=False,
                                      IMPORTANCE=True, PRECISION=PRECISION, DROPOUT=DROPOUT)
    if n1 > 0:  # (the branch spares the loop's setup where nothing is forgotten, as at init)
        for n0 in range(0, n1, BLOCK_N):                 # key tiles in forgotten blocks: q.k alone
            acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, c_off, K, V, B, G, stride_kl, stride_vl, g_q, c0,
                                          scale, i, n0, L, MASK, dropout_p, DH, DS, BLOCK, BLOCK_N, DIAGONAL=False,
                                          IMPORTANCE=False, PRECISION=PRECISION, DROPOUT=DROPOUT)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_i[:, None]
    if DROPOUT:
        o = o / (1.0 - dropout_p)  # the kept weights' factor Z; the log-sum-exp below stays the softmax's
    d = tl.arange(0, DH)
    o_out = o.to(O.dtype.element_ty)
    tl.store(O + i[:, None] * stride_ol + d[None, :], o_out, mask=i[:, None] < L)
    if PRECISION == 'tf32':  # 16-bit o: its rounding, kept for delta
        tl.store(OL + bh * L * DH + i[:, None] * DH + d[None, :], (o - o_out.to(tl.float32)).to(OL.dtype.element_ty),
                 mask=i[:, None] < L)
    tl.store(LSE + i, m_i + tl.log2(l_i), mask=i < L)  # log2-sum-exp2 of the row's scores


# -----------------------------------------------------------------------------
# backward: dq, dC per query tile (walking the keys before it), then dk, dv, dB per key tile
# (walking the queries after it). P is recomputed from the saved log-sum-exp. The first
# kernel also writes delta_i = o_i . do_i, which the second reads.

@triton.jit
def _dq_step(dq, dc, q, do, c_tile, lse, delta, K, V, B, G, stride_kl, stride_vl, g_q, c0, scale, i, n0, L,
             MASK, dropout_p, DH: tl.constexpr, DS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
             DIAGONAL: tl.constexpr, IMPORTANCE: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    j = n0 + tl.arange(0, BLOCK_N)
    k, v = _rows(K, j, L, stride_kl, DH), _rows(V, j, L, stride_vl, DH)
    b_tile, g_k = k, g_q  # unused without the importance
    if IMPORTANCE:
        b_tile, g_k = _channel(B, j, L, 1.0, DS, PRECISION=PRECISION), tl.load(G + j, mask=j < L, other=0.0)
        if not DIAGONAL:
            b_tile = _decayed(b_tile, c0, g_k, 1.0, PRECISION=PRECISION)  # exp(c0 - g_j) <= 1
    s = _scores(q, k, c_tile, b_tile, g_q, g_k, scale, i, j, L, DIAGONAL=DIAGONAL, IMPORTANCE=IMPORTANCE,
                PRECISION=PRECISION)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:  # dP_ij = Z_ij dO_i . V_j: o saw the kept weights alone (Z's factor is in p and delta)
        dp = tl.where(_kept(MASK, i, j, L, BLOCK), dp, 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    if IMPORTANCE:
        if DIAGONAL:
            ds = ds * tl.exp2(tl.minimum(g_q[:, None] - g_k[None, :], 0.0) * LOG2E)
        dc += tl.dot(ds.to(b_tile.dtype), b_tile, input_precision=PRECISION)
    return dq, dc


@triton.jit
def _backward_dq(Q, K, V, C, B, G, LAM, O, OL, DO, LSE, DELTA, MASK, DQ, DC, DGQ, DLAM, stride_qb, stride_qh, stride_ql,
                 stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_dob, stride_doh, stride_dol,
                 stride_ob, stride_oh, stride_ol, H, L, scale, dropout_p, DH: tl.constexpr,
                 DS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCKS: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """BLOCK_M queries of one (batch, head), walking key tiles of BLOCK_N. DO and DQ share the strides stride_do*.
    The offset for keys in earlier blocks is g at the queries' block's first row, as in _forward.
    Writes dL/dR(Phi)C (lambda applied) and this tile's share of dL/dlambda, sum R(Phi)C . dC."""
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    bh = tl.program_id(0)
    if DROPOUT:  # this head's dropout bits
        MASK += bh.to(tl.int64) * _mask_size(L, BLOCK)
    z, h = bh // H, bh % H
    Q, K, V = Q + z * stride_qb + h * stride_qh, K + z * stride_kb + h * stride_kh, V + z * stride_vb + h * stride_vh
    O = O + z * stride_ob + h * stride_oh
    DO, DQ = DO + z * stride_dob + h * stride_doh, DQ + z * stride_dob + h * stride_doh
    C, B, DC, G = C + bh * L * DS, B + bh * L * DS, DC + bh * L * DS, G + bh * L
    LSE, DELTA, DGQ = LSE + bh * L, DELTA + bh * L, DGQ + bh * L
    block_start = m0 - m0 % BLOCK
    n1 = _remembered_keys(G, block_start, BLOCK, BLOCKS)
    i = m0 + tl.arange(0, BLOCK_M)
    lam = tl.load(LAM + h)
    q, do, rc = _rows(Q, i, L, stride_ql, DH), _rows(DO, i, L, stride_dol, DH), _rows(C, i, L, DS, DS)
    c_tile = _rounded(rc * lam, PRECISION=PRECISION)
    o = _rows(O, i, L, stride_ol, DH).to(tl.float32)
    if PRECISION == 'tf32':  # o as _forward computed it: a 16-bit o put its rounding into every dS_ij of the row,
        o += _rows(OL + bh * L * DH, i, L, DH, DH).to(tl.float32)  # and sums over them (dlambda, dg) kept it
    delta = tl.sum(o * do.to(tl.float32), 1)  # sum_j P_ij dP_ij = o_i . do_i
    tl.store(DELTA + i, delta, mask=i < L)
    g_q = tl.load(G + i, mask=i < L, other=float('-inf'))
    lse = tl.load(LSE + i, mask=i < L, other=0.0)
    if DROPOUT:  # the steps' p is P / (1 - dropout_p), delta takes (1 - dropout_p): Z's factor costs no product
        lse, delta = lse + tl.log2(1.0 - dropout_p), delta * (1.0 - dropout_p)
    c0 = tl.load(G + block_start)
    dq = tl.zeros([BLOCK_M, DH], tl.float32)
    dc = tl.zeros([BLOCK_M, DS], tl.float32)
    if n1 > 0:  # first: placed after the loops below, it slowed the whole kernel (docs/performance.md)
        for n0 in range(0, n1, BLOCK_N):            # key tiles in forgotten blocks: q.k alone
            dq, dc = _dq_step(dq, dc, q, do, c_tile, lse, delta, K, V, B, G, stride_kl, stride_vl, g_q, c0, scale,
                              i, n0, L, MASK, dropout_p, DH, DS, BLOCK, BLOCK_N, DIAGONAL=False, IMPORTANCE=False,
                              PRECISION=PRECISION, DROPOUT=DROPOUT)
    for n0 in range(block_start, m0 + BLOCK_M, BLOCK_N):  # key tiles in the queries' block (pairwise)
        dq, dc = _dq_step(dq, dc, q, do, c_tile, lse, delta, K, V, B, G, stride_kl, stride_vl, g_q, c0, scale,
                          i, n0, L, MASK, dropout_p, DH, DS, BLOCK, BLOCK_N, DIAGONAL=True, IMPORTANCE=True,
                          PRECISION=PRECISION, DROPOUT=DROPOUT)
    dg = tl.sum(c_tile * dc, 1)     # sum_j dS_ij W_ij, from the very products the scores used
    c_off = _decayed(c_tile, g_q, c0, 1 / scale, PRECISION=PRECISION)  # exp(g_i - c0) <= 1, as in _forward
    dc_off = tl.zeros([BLOCK_M, DS], tl.float32)
    for n0 in range(n1, block_start, BLOCK_N):      # key tiles in earlier blocks
        dq, dc_off = _dq_step(dq, dc_off, q, do, c_off, lse, delta, K, V, B, G, stride_kl, stride_vl, g_q, c0, scale,
                              i, n0, L, MASK, dropout_p, DH, DS, BLOCK, BLOCK_N, DIAGONAL=False, IMPORTANCE=True,
                              PRECISION=PRECISION, DROPOUT=DROPOUT)
    dg += tl.sum(c_off * dc_off, 1) * scale
    dc += dc_off * tl.exp2(tl.minimum(g_q - c0, 0.0) * LOG2E)[:, None]  # c_off's factor (b_tile's is in dc_off)
    e = tl.arange(0, DS)
    tl.store(DC + i[:, None] * DS + e[None, :], (dc * lam).to(DC.dtype.element_ty), mask=i[:, None] < L)
    tl.store(DGQ + i, dg, mask=i < L)
    tl.store(DLAM + bh * tl.num_programs(1) + m0 // BLOCK_M, tl.sum(rc * dc))  # rows past L are 0 in rc
    d = tl.arange(0, DH)
    tl.store(DQ + i[:, None] * stride_dol + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=i[:, None] < L)


@triton.jit
def _dkdv_step(dk, dv, db, dg, k, v, b_tile, Q, DO, C, G, LSE, DELTA, stride_ql, stride_dol, lam, g_k, scale, j, m0,
               L, MASK, dropout_p, DH: tl.constexpr, DS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
               DIAGONAL: tl.constexpr, IMPORTANCE: tl.constexpr, PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    i = m0 + tl.arange(0, BLOCK_M)
    q, do = _rows(Q, i, L, stride_ql, DH), _rows(DO, i, L, stride_dol, DH)
    lse = tl.load(LSE + i, mask=i < L, other=0.0)
    delta = tl.load(DELTA + i, mask=i < L, other=0.0)
    if DROPOUT:  # p below is P / (1 - dropout_p), delta takes (1 - dropout_p), as in _backward_dq
        lse, delta = lse + tl.log2(1.0 - dropout_p), delta * (1.0 - dropout_p)
    c_tile, g_q, c0 = q, g_k, 0.0  # unused without the importance
    if IMPORTANCE:
        c_tile, g_q = _channel(C, i, L, lam, DS, PRECISION=PRECISION), tl.load(G + i, mask=i < L, other=float('-inf'))
        if not DIAGONAL:  # the offset _forward took for these queries: g at the start of their block
            c0 = tl.load(G + m0 - m0 % BLOCK)
            c_tile = _decayed(c_tile, g_q, c0, 1 / scale, PRECISION=PRECISION)  # exp(g_i - c0) <= 1
            b_tile = _decayed(b_tile, c0, g_k, 1.0, PRECISION=PRECISION)        # exp(c0 - g_j) <= 1
    s = _scores(q, k, c_tile, b_tile, g_q, g_k, scale, i, j, L, DIAGONAL=DIAGONAL, IMPORTANCE=IMPORTANCE,
                PRECISION=PRECISION)
    p = tl.exp2(s - lse[:, None])                                  # (queries, keys)
    p_kept = p.to(do.dtype)
    if DROPOUT:  # v met the kept weights P_ij Z_ij alone, and the gradient returns through them
        kept = _kept(MASK, i, j, L, BLOCK)
        p_kept = tl.where(kept, p_kept, 0.0)
    dv += tl.dot(tl.trans(p_kept), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        dp = tl.where(kept, dp, 0.0)
    ds = p * (dp - delta[:, None])                                 # dL/dscore_ij
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    if IMPORTANCE:
        if DIAGONAL:
            ds = ds * tl.exp2(tl.minimum(g_q[:, None] - g_k[None, :], 0.0) * LOG2E)
            db_step = tl.dot(tl.trans(ds.to(c_tile.dtype)), c_tile, input_precision=PRECISION)
            db += db_step
        else:
            db_step = tl.dot(tl.trans(ds.to(c_tile.dtype)), c_tile, input_precision=PRECISION) * scale
            db += db_step * tl.exp2(tl.minimum(c0 - g_k, 0.0) * LOG2E)[:, None]
        dg += tl.sum(b_tile * db_step, 1)  # sum_i dS_ij W_ij, from the very products the scores used
    return dk, dv, db, dg


@triton.jit
def _backward_dkdv(Q, K, V, C, B, G, LAM, DO, LSE, DELTA, DGQ, MASK, DK, DV, DB, DG, stride_qb, stride_qh, stride_ql,
                   stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_dob, stride_doh,
                   stride_dol, H, L, scale, dropout_p, DH: tl.constexpr, DS: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
                   PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    """BLOCK_N keys of one (batch, head), walking query tiles of BLOCK_M. DO, DK, DV share the strides stride_do*.
    Queries in the keys' block pair with them pairwise; query tiles in later blocks take the
    offset _forward took for them (g at their block's first row). Runs after _backward_dq,
    whose delta it reads and whose query-side sum for dL/dg it completes."""
    n0 = tl.program_id(1) * BLOCK_N  # the first keys walk the most queries: they start first (_launch)
    bh = tl.program_id(0)
    if DROPOUT:  # this head's dropout bits
        MASK += bh.to(tl.int64) * _mask_size(L, BLOCK)
    z, h = bh // H, bh % H
    Q, K, V = Q + z * stride_qb + h * stride_qh, K + z * stride_kb + h * stride_kh, V + z * stride_vb + h * stride_vh
    DO, DK, DV = DO + z * stride_dob + h * stride_doh, DK + z * stride_dob + h * stride_doh, \
        DV + z * stride_dob + h * stride_doh
    C, B, DB, G = C + bh * L * DS, B + bh * L * DS, DB + bh * L * DS, G + bh * L
    LSE, DELTA, DGQ, DG = LSE + bh * L, DELTA + bh * L, DGQ + bh * L, DG + bh * L
    block_end = n0 - n0 % BLOCK + BLOCK             # the end of the keys' block
    m1 = tl.minimum(_remembered_queries(G, block_end, L, BLOCK, BLOCKS), L)
    j = n0 + tl.arange(0, BLOCK_N)
    lam = tl.load(LAM + h)
    k, v = _rows(K, j, L, stride_kl, DH), _rows(V, j, L, stride_vl, DH)
    b_tile = _channel(B, j, L, 1.0, DS, PRECISION=PRECISION)
    g_k = tl.load(G + j, mask=j < L, other=0.0)
    dk = tl.zeros([BLOCK_N, DH], tl.float32)
    dv = tl.zeros([BLOCK_N, DH], tl.float32)
    db = tl.zeros([BLOCK_N, DS], tl.float32)
    dg = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(n0 - n0 % BLOCK_M, block_end, BLOCK_M):  # query tiles in the keys' block (pairwise)
        dk, dv, db, dg = _dkdv_step(dk, dv, db, dg, k, v, b_tile, Q, DO, C, G, LSE, DELTA, stride_ql, stride_dol,
                                    lam, g_k, scale, j, m0, L, MASK, dropout_p, DH, DS, BLOCK, BLOCK_M,
                                    DIAGONAL=True, IMPORTANCE=True, PRECISION=PRECISION, DROPOUT=DROPOUT)
    for m0 in range(block_end, m1, BLOCK_M):        # query tiles in later blocks
        dk, dv, db, dg = _dkdv_step(dk, dv, db, dg, k, v, b_tile, Q, DO, C, G, LSE, DELTA, stride_ql, stride_dol,
                                    lam, g_k, scale, j, m0, L, MASK, dropout_p, DH, DS, BLOCK, BLOCK_M,
                                    DIAGONAL=False, IMPORTANCE=True, PRECISION=PRECISION, DROPOUT=DROPOUT)
    e = tl.arange(0, DS)
    tl.store(DB + j[:, None] * DS + e[None, :], db.to(DB.dtype.element_ty), mask=j[:, None] < L)
    # dL/dg_j = sum_i dS_ji W_ji - sum_i dS_ij W_ij: the query side from _backward_dq, the key side here
    tl.store(DG + j, tl.load(DGQ + j, mask=j < L, other=0.0) - dg, mask=j < L)
    if m1 < L:  # query tiles in later blocks that forgot these keys: q.k alone, into accumulators of their
        # own (carrying dk, dv through this loop slowed the whole kernel: docs/performance.md)
        dk_far, dv_far = tl.zeros([BLOCK_N, DH], tl.float32), tl.zeros([BLOCK_N, DH], tl.float32)
        for m0 in range(m1, L, BLOCK_M):
            dk_far, dv_far, db, dg = _dkdv_step(dk_far, dv_far, db, dg, k, v, b_tile, Q, DO, C, G, LSE, DELTA,
                                                stride_ql, stride_dol, lam, g_k, scale, j, m0, L, MASK, dropout_p,
                                                DH, DS, BLOCK, BLOCK_M, DIAGONAL=False, IMPORTANCE=False,
                                                PRECISION=PRECISION, DROPOUT=DROPOUT)
        dk, dv = dk + dk_far, dv + dv_far
    d = tl.arange(0, DH)
    tl.store(DK + j[:, None] * stride_dol + d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=j[:, None] < L)
    tl.store(DV + j[:, None] * stride_dol + d[None, :], dv.to(DV.dtype.element_ty), mask=j[:, None] < L)


@triton.jit
def _dropout_bits(SEED, MASK, L, dropout_p, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """The dropout bits of one BLOCK x BLOCK tile of one (batch, head), drawn from Philox (_draw) into the
    stored mask that the attention kernels read (_mask_tile); with CAUSAL none above the diagonal. A program
    a tile, so that every program draws as much: with one a row of tiles, the last row's drew l / BLOCK tiles
    one after another while most of the GPU waited (docs/performance.md)."""
    qb, kb, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if not CAUSAL or kb <= qb:
        i, j = qb * BLOCK + tl.arange(0, BLOCK), kb * BLOCK + tl.arange(0, BLOCK)
        MASK += bh.to(tl.int64) * _mask_size(L, BLOCK)
        tl.store(_mask_tile(MASK, i, j, L, BLOCK), _draw(_dropout_key(SEED, bh), i, j, L, dropout_p).to(tl.uint8))


# -----------------------------------------------------------------------------
# The attention op: forward and backward registered with torch.library, so torch.compile sees
# one opaque call (no graph break) and autograd knows its gradient.

def _cdiv(a, b):
    """triton.cdiv on the host: Triton's serves kernels too, through a wrapper that costs microseconds a
    call, several times a layer in eager evaluation and in steps without CUDA graphs."""
    return -(-a // b)


def _next_pow2(n):
    """triton.next_power_of_2 on the host (see _cdiv): the least power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def _pad_to_pow2(x, least=16):
    """Zero columns up to a power of two >= 16 (what tl.arange and tl.dot need): they add nothing to any dot."""
    n = x.size(-1)
    width = max(least, _next_pow2(n))
    return x if width == n else F.pad(x, (0, width - n))


def _bhl(t):  # (batch, head, row) strides of a (b, h, l, d) tensor
    assert t.stride(-1) == 1
    return t.stride(0), t.stride(1), t.stride(2)


def _empty_bhld(like):  # (b, h, l, d) laid out as (b, l, h, d): the model reshapes it to (b, l, h * d) next
    b, h, l, d = like.shape
    return torch.empty(b, l, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def _launch(kernel, name, rows, q, RC, scale, dropout_p, *args):
    """kernel[grid](*args) with launch_config(name): a program per tile of `rows` ('BLOCK_M' or 'BLOCK_N')
    rows, per batch x head. Without dropout (dropout_p 0) DROPOUT compiles the kernel without it.
    The grid's first axis is batch x head, so every head's longest tile (the last queries, the first
    keys) starts before any head's next one, and the short ones fill the end: with the tiles first,
    the last heads' long tiles started last while most of the GPU waited (docs/performance.md).

    C and B arrive in fp32 whatever q's dtype. Beside q.k's bf16 or fp16 the kernels round each tile of
    them to fp16's values as they load and scale it (_channel, _decayed): the importance in every score
    is an fp16 dot of those, twice tf32's rate, and dC, dB are tf32 dots of the same values against dS,
    which can fall below fp16's range. lambda C.B can be several times q.k / sqrt(d_h), and bf16
    operands (a relative rounding of 2^-8, fp16's and tf32's is 2^-11) left larger errors in the output
    and in the gradients of lambda, log_alpha and theta, sums that nearly cancel (docs/performance.md).
    fp16's range is the limit: lambda sqrt(d_h) R(Phi)C and R(Phi)B must stay below 65504 (the decays
    only shrink them; train.py's evaluations warn as they near it), and values below 2^-14, decayed that far,
    round to steps of 2^-24."""
    b, h, l, d_h = q.shape
    d_s = RC.size(-1)
    meta = launch_config(name, q.device, d_s, l)
    precision = 'ieee' if q.dtype == torch.float32 else 'tf32'  # ieee: exact fp32 products, not tf32
    blocks = max(_next_pow2(_cdiv(l, meta['BLOCK'])), 2)
    kernel[(b * h, _cdiv(l, meta[rows]))](*args, h, l, scale, dropout_p, DH=d_h, DS=d_s,
                                          PRECISION=precision, BLOCKS=blocks, DROPOUT=dropout_p > 0, **meta)


@torch.library.custom_op('nanosisa::attention', mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, RC: torch.Tensor, RB: torch.Tensor,
               g: torch.Tensor, lam: torch.Tensor, seed: Optional[torch.Tensor], scale: float,
               dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o, o_low = _empty_bhld(q), _o_low(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    b, h, l, _ = q.shape
    mask = q.new_empty(b * h, 0, dtype=torch.uint8)  # without dropout nothing to read
    if dropout_p > 0:  # drawn once here, read by the forward and both backward kernels
        mask = _draw_bits(seed, b, h, l, dropout_p, launch_config('forward', q.device, RC.size(-1), l)['BLOCK'])
    _launch(_forward, 'forward', 'BLOCK_M', q, RC, scale, dropout_p, q, k, v, RC, RB, g, lam,
            mask if dropout_p > 0 else None, o, o_low if o_low.numel() else None, lse, *_bhl(q), *_bhl(k), *_bhl(v),
            *_bhl(o))
    return o, lse, mask, o_low


def _o_low(q):
    """What rounding o to q's 16 bits leaves out, for the backward's delta = o . do (none for fp32 q): the dS_ij of
    a row all take delta's rounding, and dlambda and dL/dg sum them where they nearly cancel (docs/performance.md)."""
    return torch.empty(q.shape if q.dtype != torch.float32 else 0, dtype=q.dtype, device=q.device)


@_attention.register_fake
def _(q, k, v, RC, RB, g, lam, seed, scale, dropout_p):
    b, h, l, _ = q.shape
    block = launch_config('forward', q.device, RC.size(-1), l)['BLOCK']
    mask = q.new_empty(b * h, _mask_bytes(l, block) if dropout_p > 0 else 0, dtype=torch.uint8)
    return _empty_bhld(q), q.new_empty(q.shape[:3], dtype=torch.float32), mask, _o_low(q)


@torch.library.custom_op('nanosisa::attention_backward', mutates_args=())
def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, RC: torch.Tensor,
                        RB: torch.Tensor, g: torch.Tensor, lam: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                        mask: torch.Tensor, o_low: torch.Tensor, scale: float, dropout_p: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    dq, dk, dv = _empty_bhld(q), _empty_bhld(q), _empty_bhld(q)
    do = do.transpose(1, 2).contiguous().transpose(1, 2)  # the layout of dq, dk, dv
    # fp32: dlambda and dPhi are sums over the whole sequence of terms that nearly cancel
    dRC, dRB = torch.empty_like(RC), torch.empty_like(RB)
    # dL/dg_t = sum_j dS_tj W_tj - sum_i dS_it W_it: each sum from the kernel that walks it, in fp32
    delta, dg_query, dg = torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse)
    query_tiles = _cdiv(q.size(2), launch_config('dq', q.device, RC.size(-1), q.size(2))['BLOCK_M'])
    dlam_tiles = torch.empty(q.size(0) * q.size(1), query_tiles, dtype=torch.float32, device=q.device)
    strides = (*_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do))
    mask = mask if dropout_p > 0 else None
    _launch(_backward_dq, 'dq', 'BLOCK_M', q, RC, scale, dropout_p, q, k, v, RC, RB, g, lam, o,
            o_low if o_low.numel() else None, do, lse, delta, mask, dq, dRC, dg_query, dlam_tiles, *strides, *_bhl(o))
    _launch(_backward_dkdv, 'dkdv', 'BLOCK_N', q, RC, scale, dropout_p, q, k, v, RC, RB, g, lam, do, lse,
            delta, dg_query, mask, dk, dv, dRB, dg, *strides)
    dlam = dlam_tiles.view(q.size(0), q.size(1), -1).sum((0, 2)).to(lam.dtype)  # one share per query tile
    return dq, dk, dv, dRC, dRB, dg, dlam


@_attention_backward.register_fake
def _(do, q, k, v, RC, RB, g, lam, o, lse, mask, o_low, scale, dropout_p):
    return (_empty_bhld(q), _empty_bhld(q), _empty_bhld(q), torch.empty_like(RC), torch.empty_like(RB),
            torch.empty_like(lse), torch.empty_like(lam))


def _setup_context(ctx, inputs, output):
    q, k, v, RC, RB, g, lam, seed, scale, dropout_p = inputs
    ctx.save_for_backward(q, k, v, RC, RB, g, lam, *output)  # o, lse, the dropout bits and o's rounding
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _backward(ctx, do, dlse, dmask, do_low):
    return *_attention_backward(do, *ctx.saved_tensors, ctx.scale, ctx.dropout_p), None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# The SSM's channels, sisa.ssm_channels in one kernel each way: the two scans (g and Phi),
# the rotation R(Phi) of C and B, and in the backward pass the rotation's transpose, dL/dPhi
# and the two reverse scans. Left to inductor these took several kernels a layer, and the
# rotation's backward evaluated sin and cos for every element of the SSM projection's gradient.

@triton.jit
def _cos_sin(phi):
    """cos and sin of phi, brought into [-pi, pi] first: the GPU's fast sin and cos lose accuracy
    with the size of the angle, and Phi, a sum over the sequence, grows without bound.
    2 pi = 6.28125 + 0.00193530717958...: k * 6.28125 is exact in fp32 for |k| < 2^16."""
    k = tl.floor(phi * 0.15915494309189535 + 0.5)
    r = phi - k * 6.28125 - k * 0.0019353071795864769
    return tl.cos(r), tl.sin(r)


@triton.jit
def _pairs(X, t, stride_row, stride_col, L, DS, DSP: tl.constexpr):
    """Rows t of a strided (l, DS) slab, loaded whole and split into its pairs (x[2m], x[2m+1]):
    two (rows, DSP // 2) tiles in fp32. DSP is DS rounded up to a power of two (zeros past DS)."""
    e = tl.arange(0, DSP)
    x = tl.load(X + t[:, None] * stride_row + e[None, :] * stride_col, mask=(t[:, None] >= 0) & (t[:, None] < L)
                & (e[None, :] < DS), other=0.0)
    return tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], DSP // 2, 2)))


@triton.jit
def _store_pairs(X, t, stride_row, L, DS, x0, x1, DSP: tl.constexpr):
    """The inverse of _pairs: rows t of a (l, DS) slab with unit column stride, from its pairs."""
    e = tl.arange(0, DSP)
    x = tl.reshape(tl.join(x0, x1), (x0.shape[0], DSP))
    tl.store(X + t[:, None] * stride_row + e[None, :], x.to(X.dtype.element_ty),
             mask=(t[:, None] >= 0) & (t[:, None] < L) & (e[None, :] < DS))


@triton.jit
def _channels_forward(C, B, A, TH, G, RC, RB, PHI, stride_cb, stride_ch, stride_cl, stride_cd,
                      stride_bb, stride_bh, stride_bl, stride_bd, stride_ab, stride_ah, stride_al,
                      stride_thb, stride_thh, stride_thl, stride_thd, H, L, HALF, CHUNK: tl.constexpr,
                      CARRY: tl.constexpr, WIDTH: tl.constexpr):
    """CHUNK steps of one (batch, head): g_t = sum_{k<=t} log_alpha_k, Phi_t = sum_{k<=t} theta_k,
    then R(Phi_t) C_t and R(Phi_t) B_t. Inputs are read by strides (views of the projection);
    G, RC, RB, PHI are contiguous (b, h, l, .) fp32."""
    t0, bh = tl.program_id(0) * CHUNK, tl.program_id(1)
    z, h = bh // H, bh % H
    C, B = C + z * stride_cb + h * stride_ch, B + z * stride_bb + h * stride_bh
    A, TH = A + z * stride_ab + h * stride_ah, TH + z * stride_thb + h * stride_thh
    G, PHI, RC, RB = G + bh * L, PHI + bh * L * HALF, RC + bh * L * 2 * HALF, RB + bh * L * 2 * HALF
    m = tl.arange(0, WIDTH)                                 # pairs
    # Every chunk sums the steps before it itself (rows of d_s / 2 + 1 numbers), in CARRY-row
    # loads: the chunks run in parallel, not one after another.
    g0, phi0 = tl.zeros([], tl.float32), tl.zeros([WIDTH], tl.float32)
    for s0 in range(0, t0, CARRY):
        s = s0 + tl.arange(0, CARRY)
        g0 += tl.sum(tl.load(A + s * stride_al, mask=s < t0, other=0.0).to(tl.float32), 0)
        th = tl.load(TH + s[:, None] * stride_thl + m[None, :] * stride_thd,
                     mask=(s[:, None] < t0) & (m[None, :] < HALF), other=0.0)
        phi0 += tl.sum(th.to(tl.float32), 0)
    t = t0 + tl.arange(0, CHUNK)
    mask = (t[:, None] < L) & (m[None, :] < HALF)
    g = tl.cumsum(tl.load(A + t * stride_al, mask=t < L, other=0.0).to(tl.float32), 0) + g0
    th = tl.load(TH + t[:, None] * stride_thl + m[None, :] * stride_thd, mask=mask, other=0.0)
    phi = tl.cumsum(th.to(tl.float32), 0) + phi0[None, :]
    tl.store(G + t, g, mask=t < L)
    tl.store(PHI + t[:, None] * HALF + m[None, :], phi, mask=mask)
    cos, sin = _cos_sin(phi)
    c_even, c_odd = _pairs(C, t, stride_cl, stride_cd, L, 2 * HALF, 2 * WIDTH)
    _store_pairs(RC, t, 2 * HALF, L, 2 * HALF, c_even * cos - c_odd * sin, c_even * sin + c_odd * cos, 2 * WIDTH)
    b_even, b_odd = _pairs(B, t, stride_bl, stride_bd, L, 2 * HALF, 2 * WIDTH)
    _store_pairs(RB, t, 2 * HALF, L, 2 * HALF, b_even * cos - b_odd * sin, b_even * sin + b_odd * cos, 2 * WIDTH)


@triton.jit
def _rotate_back(X, DR, DX, t, stride_row, stride_col, stride_out, L, HALF, cos, sin, WIDTH: tl.constexpr):
    """DX[t] = R(Phi_t)^T dL/dRX_t (per pair: d0 cos + d1 sin, d1 cos - d0 sin); returns this
    channel's share of dL/dPhi_t, RX_0 d1 - RX_1 d0 (dR/dPhi is R turned by 90 degrees)."""
    x0, x1 = _pairs(X, t, stride_row, stride_col, L, 2 * HALF, 2 * WIDTH)
    d0, d1 = _pairs(DR, t, 2 * HALF, 1, L, 2 * HALF, 2 * WIDTH)
    _store_pairs(DX, t, stride_out, L, 2 * HALF, d0 * cos + d1 * sin, d1 * cos - d0 * sin, 2 * WIDTH)
    return (x0 * cos - x1 * sin) * d1 - (x0 * sin + x1 * cos) * d0


@triton.jit
def _channels_backward(C, B, PHI, DRC, DRB, DC, DB, DPHI, stride_cb, stride_ch, stride_cl, stride_cd,
                       stride_bb, stride_bh, stride_bl, stride_bd, stride_dcb, stride_dch, stride_dcl, H, L, HALF,
                       CHUNK: tl.constexpr, WIDTH: tl.constexpr):
    """CHUNK steps of one (batch, head): dL/dC and dL/dB through the rotation's transpose, and
    dL/dPhi into DPHI (contiguous, fp32), which _channels_scan_back sums from the end.
    DC and DB share the strides stride_dc*; DRC, DRB, PHI are contiguous."""
    t0, bh = tl.program_id(0) * CHUNK, tl.program_id(1)
    z, h = bh // H, bh % H
    C, B = C + z * stride_cb + h * stride_ch, B + z * stride_bb + h * stride_bh
    DC, DB = DC + z * stride_dcb + h * stride_dch, DB + z * stride_dcb + h * stride_dch
    PHI, DPHI, DRC, DRB = PHI + bh * L * HALF, DPHI + bh * L * HALF, DRC + bh * L * 2 * HALF, DRB + bh * L * 2 * HALF
    t, m = t0 + tl.arange(0, CHUNK), tl.arange(0, WIDTH)
    mask = (t[:, None] < L) & (m[None, :] < HALF)
    cos, sin = _cos_sin(tl.load(PHI + t[:, None] * HALF + m[None, :], mask=mask, other=0.0))
    dphi = _rotate_back(C, DRC, DC, t, stride_cl, stride_cd, stride_dcl, L, HALF, cos, sin, WIDTH)
    dphi += _rotate_back(B, DRB, DB, t, stride_bl, stride_bd, stride_dcl, L, HALF, cos, sin, WIDTH)
    tl.store(DPHI + t[:, None] * HALF + m[None, :], dphi, mask=mask)


@triton.jit
def _channels_scan_back(DG, DPHI, DA, DTH, stride_dab, stride_dah, stride_dal, stride_dthb, stride_dthh, stride_dthl,
                        H, L, HALF, CHUNK: tl.constexpr, CARRY: tl.constexpr, WIDTH: tl.constexpr):
    """dL/dlog_alpha_t = sum_{s>=t} dL/dg_s and dL/dtheta_t = sum_{s>=t} dL/dPhi_s: CHUNK steps
    from the end of one (batch, head), step s being row L - 1 - s. DG, DPHI contiguous; DA, DTH strided."""
    s0, bh = tl.program_id(0) * CHUNK, tl.program_id(1)
    z, h = bh // H, bh % H
    DG, DPHI = DG + bh * L, DPHI + bh * L * HALF
    DA, DTH = DA + z * stride_dab + h * stride_dah, DTH + z * stride_dthb + h * stride_dthh
    m = tl.arange(0, WIDTH)
    da0, dth0 = tl.zeros([], tl.float32), tl.zeros([WIDTH], tl.float32)
    for r0 in range(0, s0, CARRY):                          # the steps before this chunk's, as in _channels_forward
        r = L - 1 - (r0 + tl.arange(0, CARRY))
        keep = r > L - 1 - s0
        da0 += tl.sum(tl.load(DG + r, mask=keep, other=0.0), 0)
        dth0 += tl.sum(tl.load(DPHI + r[:, None] * HALF + m[None, :], mask=keep[:, None] & (m[None, :] < HALF),
                               other=0.0), 0)
    t = L - 1 - (s0 + tl.arange(0, CHUNK))
    mask = (t[:, None] >= 0) & (m[None, :] < HALF)
    da = tl.cumsum(tl.load(DG + t, mask=t >= 0, other=0.0), 0) + da0
    dth = tl.cumsum(tl.load(DPHI + t[:, None] * HALF + m[None, :], mask=mask, other=0.0), 0) + dth0[None, :]
    tl.store(DA + t * stride_dal, da.to(DA.dtype.element_ty), mask=t >= 0)
    tl.store(DTH + t[:, None] * stride_dthl + m[None, :], dth.to(DTH.dtype.element_ty), mask=mask)


def _channels_launch(kernel, name, C, *args):
    """kernel[grid](*args) with launch_config(name): a program per CHUNK steps of a (batch, head) of C,
    (b, h, l, d_s)."""
    b, h, l, d_s = C.shape
    meta = launch_config(name, C.device, length=l)
    width = _next_pow2(max(d_s // 2, 1))  # the pairs, padded to a power of two
    kernel[(_cdiv(l, meta['CHUNK']), b * h)](*args, h, l, d_s // 2, WIDTH=width, **meta)


@torch.library.custom_op('nanosisa::channels', mutates_args=())
def _channels(C: torch.Tensor, B: torch.Tensor, log_alpha: torch.Tensor,
              theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, l, d_s = C.shape
    g = torch.empty(b, h, l, dtype=torch.float32, device=C.device)
    phi = torch.empty(b, h, l, d_s // 2, dtype=torch.float32, device=C.device)
    RC, RB = (torch.empty(b, h, l, d_s, dtype=torch.float32, device=C.device) for _ in range(2))
    _channels_launch(_channels_forward, 'channels_forward', C, C, B, log_alpha, theta, g, RC, RB, phi,
                     *C.stride(), *B.stride(), *log_alpha.stride(), *theta.stride())
    return g, RC, RB, phi


@_channels.register_fake
def _(C, B, log_alpha, theta):
    b, h, l, d_s = C.shape
    f32 = dict(dtype=torch.float32, device=C.device)
    return C.new_empty(b, h, l, **f32), C.new_empty(C.shape, **f32), C.new_empty(C.shape, **f32), \
        C.new_empty(b, h, l, d_s // 2, **f32)


@torch.library.custom_op('nanosisa::channels_backward', mutates_args=())
def _channels_backward_op(C: torch.Tensor, B: torch.Tensor, phi: torch.Tensor, dg: torch.Tensor, dRC: torch.Tensor,
                          dRB: torch.Tensor, la_dtype: torch.dtype,
                          th_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dC, dB, dla, dth = _channels_grads_like(C, la_dtype, th_dtype)
    dg, dRC, dRB = dg.float().contiguous(), dRC.float().contiguous(), dRB.float().contiguous()
    dphi = torch.empty_like(phi)
    _channels_launch(_channels_backward, 'channels_backward', C, C, B, phi, dRC, dRB, dC, dB, dphi,
                     *C.stride(), *B.stride(), *dC.stride()[:3])
    _channels_launch(_channels_scan_back, 'channels_scan_back', C, dg, dphi, dla, dth,
                     *dla.stride(), *dth.stride()[:3])
    return dC, dB, dla, dth


def _channels_grads_like(C, la_dtype, th_dtype):
    """dC, dB, dlog_alpha, dtheta laid out as (b, l, h, .), the projection's layout, seen as (b, h, l, .)."""
    b, h, l, d_s = C.shape
    new = lambda *shape, dtype: torch.empty(b, l, h, *shape, dtype=dtype, device=C.device).transpose(1, 2)
    return new(d_s, dtype=C.dtype), new(d_s, dtype=C.dtype), new(dtype=la_dtype), new(d_s // 2, dtype=th_dtype)


@_channels_backward_op.register_fake
def _(C, B, phi, dg, dRC, dRB, la_dtype, th_dtype):
    return _channels_grads_like(C, la_dtype, th_dtype)


def _channels_setup(ctx, inputs, output):
    C, B, log_alpha, theta = inputs
    ctx.save_for_backward(C, B, output[3])
    ctx.dtypes = log_alpha.dtype, theta.dtype


def _channels_grad(ctx, dg, dRC, dRB, dphi):  # phi is saved for the backward pass, not an output to differentiate
    C, B, phi = ctx.saved_tensors
    dg, dRC, dRB = (torch.zeros_like(x) if d is None else d for x, d in zip((phi[..., 0], C, C), (dg, dRC, dRB)))
    return _channels_backward_op(C, B, phi, dg, dRC, dRB, *ctx.dtypes)


_channels.register_autograd(_channels_grad, setup_context=_channels_setup)


# -----------------------------------------------------------------------------
# cumsum: one scan, as a custom op

@triton.jit
def _cumsum(X, Y, stride_x1, stride_x2, stride_xl, stride_xi, P2, L, I, CHUNK: tl.constexpr, WIDTH: tl.constexpr,
            REVERSE: tl.constexpr):
    """Y = cumsum of X along L, for X of shape (P1, P2, L, I) with any strides; Y contiguous.
    One program per CHUNK rows of one (p1, p2): it sums the rows before its chunk itself (the
    chunks run in parallel, not one after another) and adds them to its chunk's own scan.
    REVERSE scans from the end: row r is step L - 1 - r."""
    t0, p = tl.program_id(0) * CHUNK, tl.program_id(1)
    X, Y = X + (p // P2) * stride_x1 + (p % P2) * stride_x2, Y + p * L * I
    col = tl.arange(0, WIDTH)
    before = tl.zeros([WIDTH], Y.dtype.element_ty)
    for s0 in range(0, t0, CHUNK):                 # the steps before this chunk
        s = s0 + tl.arange(0, CHUNK)
        r = L - 1 - s if REVERSE else s
        x = tl.load(X + r[:, None] * stride_xl + col[None, :] * stride_xi, mask=(s[:, None] < L) & (col[None, :] < I),
                    other=0.0)
        before += tl.sum(x.to(Y.dtype.element_ty), 0)
    t = t0 + tl.arange(0, CHUNK)
    r = L - 1 - t if REVERSE else t
    mask = (t[:, None] < L) & (col[None, :] < I)
    x = tl.load(X + r[:, None] * stride_xl + col[None, :] * stride_xi, mask=mask, other=0.0).to(Y.dtype.element_ty)
    tl.store(Y + r[:, None] * I + col[None, :], tl.cumsum(x, 0) + before[None, :], mask=mask)


@torch.library.custom_op('nanosisa::cumsum', mutates_args=())
def _cumsum_op(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    shape, dim = x.shape, dim % x.dim()
    if dim > 2:                                    # at most two axes before the scanned one
        x = x.flatten(0, dim - 2)
    elif dim < 2:
        x = x[(None,) * (2 - dim)]
    x = x.flatten(3) if x.dim() > 4 else x.unsqueeze(-1) if x.dim() == 3 else x  # (P1, P2, L, I)
    p1, p2, l, i = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    meta = launch_config('cumsum', x.device, length=l)
    _cumsum[(_cdiv(l, meta['CHUNK']), p1 * p2)](x, y, *x.stride(), p2, l, i, WIDTH=_next_pow2(i),
                                                REVERSE=reverse, **meta)
    return y.view(shape)


@_cumsum_op.register_fake
def _(x, dim, reverse=False):
    return x.new_empty(x.shape)  # contiguous, as the real one


def _cumsum_setup(ctx, inputs, output):
    ctx.dim, ctx.reverse = inputs[1], inputs[2]


_cumsum_op.register_autograd(lambda ctx, grad: (_cumsum_op(grad, ctx.dim, not ctx.reverse), None, None),
                             setup_context=_cumsum_setup)
