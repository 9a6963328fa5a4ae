"""
nanoSISA: SSM-Informed Softmax Attention in one file.

Paper: Shin and Yang, "Forget Attention: Importance-Aware Attention Is All You
Need", arXiv 2606.02332. SISA adds an importance term, read out of a state space
model (Mamba-3's complex SSM written as rotations), to every attention score:

    score_ij = q_i . k_j / sqrt(d_h) + lambda * Cbar_i . Bbar_j          (j <= i)

    Cbar_i = exp(g_i - c) R(Phi_i) C_i      g_t   = sum_{k<=t} log alpha_k
    Bbar_j = exp(c - g_j) R(Phi_j) B_j      Phi_t = sum_{k<=t} theta_k

so Cbar_i . Bbar_j = exp(g_i - g_j) (R(Phi_i) C_i) . (R(Phi_j) B_j): key j's state
has decayed by alpha and turned back by theta at every step since j. Appending the
SSM channels to the query and key makes the whole score one stock
scaled_dot_product_attention call, with no recurrent state and no custom kernel
(while a head's decay fits the dtype; past that, one call per chunk of queries).

Read top to bottom: rotations; the SSM's inputs (C, B, log alpha, theta from x);
the naive scan (the ground truth) and the vectorized importance; SISA attention as
one SDPA call, then its exact chunked form and the dispatch to the fused kernel;
then the GPT around it. Three backend workarounds sit at the end.

Glossary of dimensions:
    b   batch size
    h   number of heads                      (n_head, H in the paper)
    l   sequence length                      (L)
    d   model width                          (n_embd)
    d_h head width, d // h                   (q, k, v)
    d_s SSM channel width, even              (d_state; B, C; theta has d_s // 2)
    V   vocabulary size
    n   keys cached so far (decoding)
"""

import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


# -----------------------------------------------------------------------------
# Rotations. One function serves both RoPE and the SSM's rotation R(Phi).

def rotate(x, angle):
    """Rotate consecutive pairs (x[2m], x[2m+1]) counterclockwise by angle[m].

    R(angle) x = (x[2m] cos - x[2m+1] sin, x[2m] sin + x[2m+1] cos).
    Args:
        x: (..., n) with n even
        angle: (..., n // 2), broadcastable against x's pairs
    Returns:
        (..., n)
    """
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., n/2) each
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rope_angles(positions, head_dim, base=10000.0):
    """RoPE angles (l, head_dim // 2): position p turns pair m by p * base^(-2m / head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    return positions.float()[:, None] * inv_freq[None, :]


# -----------------------------------------------------------------------------
# The SSM's inputs, read from each token by one linear projection (Sec. 3.1).

def ssm_inputs(u, a_bias, lambda_raw, d_state):
    """Split u = x W_ssm, the projection of a layer's input x, into the SSM's inputs per head:
    B_t = W_B x_t and C_t = W_C x_t, what token t writes and reads; a_t = w_a . x_t + b_a, its
    decay alpha_t = exp(-softplus(a_t)) in (0, 1); theta_t = W_theta x_t, its angles; and
    lambda = softplus(lambda_raw), the importance's weight against q.k.
    Args:
        u: (b, l, h (2 d_s + 1 + d_s / 2)), the columns of W_B, W_C, w_a, W_theta in that order
        a_bias, lambda_raw: (h,)
    Returns:
        C, B: (b, h, l, d_s); log_alpha: (b, h, l), fp32; theta: (b, h, l, d_s / 2); lam: (h,)
    """
    b, l, _ = u.shape
    h, d_s = a_bias.numel(), d_state
    B, C, a, theta = u.split([h * d_s, h * d_s, h, h * d_s // 2], dim=-1)
    B, C = (t.view(b, l, h, d_s).transpose(1, 2) for t in (B, C))  # (b, h, l, d_s)
    theta = theta.view(b, l, h, d_s // 2).transpose(1, 2)      # (b, h, l, d_s/2)
    log_alpha = -F.softplus(a.float().transpose(1, 2) + a_bias[:, None])  # (b, h, l)
    return C, B, log_alpha, theta, F.softplus(lambda_raw)


# -----------------------------------------------------------------------------
# The importance term, twice: a naive scan to read and test against, and the
# vectorized L x L form, the same split into a query side and a key side that the
# attention below concatenates onto q and k (it never builds the L x L matrix).

def importance_naive(C, B, log_alpha, theta, lam):
    """lambda * Cbar_i . Bbar_j by the obvious loop over time (the paper's SSM, Sec. 3).

    Every past key j keeps its own d_s-dimensional state. At step t each state is
    decayed by alpha_t and turned by -theta_t, then B_t is written in as key t's
    state, and every state is read out with C_t. The turn is clockwise because
    (R(Phi_i) C_i) . (R(Phi_j) B_j) = C_i . R(Phi_j - Phi_i) B_j: key j's state turned
    back by every theta since j.
    Mamba adds the states up, each written with its token's input, and reads out the sum;
    SISA needs each key's term C_i . state_j on its own, to add to score_ij: one state per key.
    No cumsum, no exp of a sum, no offset: it only ever multiplies by alpha <= 1,
    so it is slow, obvious and stable. It exists to teach and to test; use
    `importance` or `sisa_attention` for real work.

    Args:
        C, B: (b, h, l, d_s)
        log_alpha: (b, h, l), log of the decay alpha_t in (0, 1)
        theta: (b, h, l, d_s // 2), rotation angles
        lam: (h,), lambda > 0
    Returns:
        (b, h, l, l): entry [i, j] = lambda * Cbar_i . Bbar_j for j <= i, else 0
    """
    b, h, l, d_s = C.shape
    alpha = log_alpha.exp()
    states = torch.zeros(b, h, l, d_s, dtype=C.dtype, device=C.device)  # one per key
    out = torch.zeros(b, h, l, l, dtype=C.dtype, device=C.device)
    for t in range(l):
        past = states[:, :, :t]
        past = alpha[:, :, t, None, None] * rotate(past, -theta[:, :, t, None, :])
        states = torch.cat([past, B[:, :, t:t + 1], states[:, :, t + 1:]], dim=2)
        read = (states[:, :, :t + 1] * C[:, :, t:t + 1]).sum(-1)  # (b, h, t+1)
        out[:, :, t, :t + 1] = lam[None, :, None] * read
    return out


def max_decay_span(dtype):
    """How many nats of cumulative decay (max g - min g) one SDPA call can hold in dtype.

    With the midpoint offset c, entries of Cbar and Bbar grow up to exp(span / 2),
    and the masked products Cbar_i . Bbar_j with j > i, which some SDPA backends
    compute before masking, up to exp(span). So span may reach log(dtype's max), less
    log(2^10) of room for the rest of a product, |C| |B| d_s lambda sqrt(d_h):
    about 82 nats in fp32 and bf16 (the same exponent), 4 in fp16 (max 65504).
    The paper clamps g - c to +-11 whatever the dtype (paper_attention).
    """
    return math.log(torch.finfo(dtype).max) - 10 * math.log(2)


def ssm_channels(C, B, log_alpha, theta, cumsum=torch.cumsum):
    """The cumulative decay and rotation (Sec. 3.2), in fp32 (fp64 stays fp64).

    Returns:
        g: (b, h, l), g_t = sum_{k<=t} log alpha_k (non-increasing)
        RC, RB: (b, h, l, d_s), R(Phi_t) C_t and R(Phi_t) B_t
    """
    dtype = torch.promote_types(C.dtype, torch.float32)
    g = cumsum(log_alpha.to(dtype), dim=-1)
    phi = cumsum(theta.to(dtype), dim=-2)
    RC, RB = rotate(torch.stack((C, B)).to(dtype), phi).unbind(0)  # one rotation for both: the same angles
    return g, RC, RB


def importance(C, B, log_alpha, theta, lam):
    """importance_naive, vectorized: cumsum, offset, rotation, one matmul.

    exp(g_i - g_j) is split into exp(g_i - c) on the query side and exp(c - g_j)
    on the key side so that it becomes a plain dot product. The offset
    c = (max g + min g) / 2 per sequence and head centres both factors; the clamp
    (from g's dtype, fp32 or fp64, see max_decay_span) only bites when a sequence's
    decay span exceeds what the dtype holds, and then the result is no longer
    exact: sisa_attention chunks instead.
    Args and Returns: as importance_naive.
    """
    g, RC, RB = ssm_channels(C, B, log_alpha, theta)
    c = (g.amax(-1, keepdim=True) + g.amin(-1, keepdim=True)) / 2
    bound = max_decay_span(g.dtype) / 2
    gc = (g - c).clamp(-bound, bound)
    Cbar = gc.exp()[..., None] * RC
    Bbar = (-gc).exp()[..., None] * RB
    imp = lam.to(g.dtype)[None, :, None, None] * (Cbar @ Bbar.transpose(-2, -1))
    return imp.tril().to(C.dtype)


# -----------------------------------------------------------------------------
# SISA attention: the importance term folded into one SDPA call (Sec. 3.3).

def channel_scale(lam, d_h, dtype):
    """s = d_h^(1/4) sqrt(lambda), (1, h, 1, 1): the factor on Cbar and Bbar in [q ; s Cbar] and [k ; s Bbar]."""
    return d_h ** 0.25 * lam.to(dtype).sqrt()[None, :, None, None]


def sisa_attention_sdpa(q, k, v, g, RC, RB, lam, c, dropout_p=0.0):
    """softmax(q.k / sqrt(d_h) + lambda Cbar.Bbar + causal mask) v as ONE stock SDPA call.

    With s = d_h^(1/4) sqrt(lambda) (channel_scale), Qhat = [q ; s Cbar] and Khat = [k ; s Bbar]:
    Qhat.Khat / sqrt(d_h) = q.k / sqrt(d_h) + (s^2 / sqrt(d_h)) Cbar.Bbar, and
    s^2 / sqrt(d_h) = lambda. sdpa (end of file) is F.scaled_dot_product_attention with
    workarounds for two backends that leave the numbers as they are. The scale is passed
    explicitly because SDPA's default would be 1 / sqrt(d_h + d_s). Exact while
    exp(g - c) and exp(c - g) stay in the dtype (max_decay_span);
    sisa_attention_chunked makes sure they do.
    Args:
        q, k, v: (b, h, l, d_h), RoPE already applied to q and k
        g, RC, RB: from ssm_channels; lam: (h,)
        c: (b, h, 1, 1), the offset
    Returns:
        (b, h, l, d_h)
    """
    s = channel_scale(lam, q.size(-1), g.dtype)                           # (1, h, 1, 1)
    sCbar = (g[..., None] - c).exp() * (s * RC)                           # s Cbar: (b, h, l, d_s)
    sBbar = (c - g[..., None]).exp() * (s * RB)                           # s Bbar: (b, h, l, d_s)
    Qhat = torch.cat([q, sCbar.to(q.dtype)], dim=-1)                       # (b, h, l, d_h + d_s)
    Khat = torch.cat([k, sBbar.to(k.dtype)], dim=-1)                       # (b, h, l, d_h + d_s)
    return sdpa(Qhat, Khat, v, dropout_p=dropout_p, is_causal=True, scale=1 / math.sqrt(q.size(-1)))


def sisa_attention_chunked(q, k, v, C, B, log_alpha, theta, lam, dropout_p=0.0):
    """sisa_attention_sdpa, exact at any decay: one call where it fits, query chunks where not.

    A sequence whose decay spans more nats than the dtype holds (max_decay_span) would
    overflow or need the paper's clamp, which changes the scores and, as c depends on the
    last token, breaks causality. Then the queries are split into chunks that each fit,
    each chunk with its own offset: the cumulative decay at its first query. Keys from the
    far past get an importance that underflows to 0, its true value (their q.k stays). Each
    chunk is one SDPA call with a lower-right causal mask, so a head that forgets N nats per
    block costs about N / max_decay_span calls: fine for the short blocks of a CPU; the fused
    kernel does it in one launch. Args, Returns: as sisa_attention below, without kernel and offset.
    """
    g, RC, RB = ssm_channels(C, B, log_alpha, theta)
    span = g[..., 0] - g[..., -1]  # (b, h); g never increases
    limit = max_decay_span(q.dtype)
    if q.device.type == 'meta' or span.max() <= limit:  # one call (meta: shapes without values, as a test traces)
        c = ((g[..., 0] + g[..., -1]) / 2)[..., None, None]  # the midpoint: both factors in range
        return sisa_attention_sdpa(q, k, v, g, RC, RB, lam, c, dropout_p)
    s = channel_scale(lam, q.size(-1), g.dtype)
    sRC, sRB, out, l, i0 = s * RC, s * RB, [], q.size(-2), 0
    while i0 < l:
        # longest chunk whose decay span fits, for every sequence and head
        chunk_span = (g[..., i0, None] - g[..., i0:]).amax(dim=(0, 1))  # (l - i0,)
        i1 = i0 + max(1, int((chunk_span <= limit).sum()))
        c = g[..., i0, None, None]
        sCbar = (g[..., i0:i1, None] - c).exp() * sRC[..., i0:i1, :]   # queries i0 .. i1-1
        sBbar = (c - g[..., :i1, None]).exp() * sRB[..., :i1, :]       # keys 0 .. i1-1
        Qhat = torch.cat([q[..., i0:i1, :], sCbar.to(q.dtype)], dim=-1)
        Khat = torch.cat([k[..., :i1, :], sBbar.to(k.dtype)], dim=-1)
        mask = torch.ones(i1 - i0, i1, dtype=torch.bool, device=q.device).tril(diagonal=i0)
        out.append(sdpa(Qhat, Khat, v[..., :i1, :], attn_mask=mask, dropout_p=dropout_p,
                        scale=1 / math.sqrt(q.size(-1))))
        i0 = i1
    return torch.cat(out, dim=-2)


def sisa_attention(q, k, v, C, B, log_alpha, theta, lam, dropout_p=0.0, kernel='auto', sisa_offset='exact'):
    """SISA attention, exact at any decay: the fused kernel where it runs, else the chunked SDPA form.

    Args:
        q, k, v: (b, h, l, d_h), RoPE already applied to q and k
        C, B, log_alpha, theta, lam: as importance_naive
        dropout_p: attention dropout, as SDPA's: each weight of the softmax kept with probability 1 - p
        kernel: 'auto', 'triton' or 'sdpa' (see fused_kernel)
        sisa_offset: 'exact', or 'paper' for the ablation of the paper's recipe (paper_attention)
    Returns:
        (b, h, l, d_h)
    """
    if sisa_offset == 'paper':
        return paper_attention(q, k, v, C, B, log_alpha, theta, lam, dropout_p)
    if fused_kernel(kernel, q.device):
        import sisa_kernel  # imports Triton: only where it is used
        g, RC, RB = sisa_kernel.channels(C, B, log_alpha, theta)  # ssm_channels, fused
        return sisa_kernel.sisa_attention_fused(q, k, v, g, RC, RB, lam, dropout_p)
    return sisa_attention_chunked(q, k, v, C, B, log_alpha, theta, lam, dropout_p)


HAS_TRITON = importlib.util.find_spec('triton') is not None  # looked up once: torch.compile cannot trace it


def fused_kernel(kernel, device):
    """Whether sisa_attention runs sisa_kernel.py's fused kernel (attention dropout too) instead of the SDPA form.

    'sdpa': never. 'auto': on CUDA (compute capability 7.0 or newer) where Triton is installed.
    'triton': always; it runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (Triton's interpreter,
    which the tests use), and anywhere else is a clear error, never a silent fallback.
    """
    if kernel not in ('auto', 'triton', 'sdpa'):
        raise ValueError(f"kernel must be 'auto', 'triton' or 'sdpa', got {kernel!r}")
    if kernel == 'sdpa':
        return False
    why = None
    if not HAS_TRITON:
        why = 'Triton is not installed (it comes with PyTorch for CUDA on Linux)'
    elif device.type != 'cuda' and not (kernel == 'triton' and os.environ.get('TRITON_INTERPRET') == '1'):
        why = f'it runs on CUDA, not on {device.type}'
    elif device.type == 'cuda' and torch.cuda.get_device_properties(device).major < 7:
        why = 'Triton needs a GPU of compute capability 7.0 or newer (Volta on)'
    if why and kernel == 'triton':
        raise ValueError(f"kernel='triton' cannot run here: {why}; use kernel='sdpa'")
    return why is None


def paper_attention(q, k, v, C, B, log_alpha, theta, lam, dropout_p=0.0, bound=11.0):
    """The paper's recipe, kept for the ablation (train.py --sisa_offset=paper): one SDPA call
    with the offset c = (max g + min g) / 2 of the whole sequence and (g - c) clamped to
    [-bound, bound]. Exact while a sequence's decay spans at most 2 bound = 22 nats. Beyond
    that the clamp changes the scores, and since min g is the last token's, earlier outputs
    depend on the last token: not causal. Args and Returns: as sisa_attention.
    """
    cumsum = torch.cumsum
    if q.device.type == 'cuda' and HAS_TRITON:  # inductor failed on torch.cumsum in a whole-model graph
        import sisa_kernel
        cumsum = sisa_kernel.cumsum
    g, RC, RB = ssm_channels(C, B, log_alpha, theta, cumsum=cumsum)
    s = channel_scale(lam, q.size(-1), g.dtype)
    gc = (g - (g.amax(-1, keepdim=True) + g.amin(-1, keepdim=True)) / 2).clamp(-bound, bound)[..., None]
    Qhat = torch.cat([q, (gc.exp() * s * RC).to(q.dtype)], dim=-1)
    Khat = torch.cat([k, ((-gc).exp() * s * RB).to(k.dtype)], dim=-1)
    return sdpa(Qhat, Khat, v, dropout_p=dropout_p, is_causal=True, scale=1 / math.sqrt(q.size(-1)))


# -----------------------------------------------------------------------------
# The model: a small RoPE GPT (RMSNorm, SwiGLU, tied embeddings) whose attention
# is SISA or, with attention='softmax', the plain parameter-matched baseline.

@dataclass
class GPTConfig:  # layers, heads, width, block: nanoGPT's tiny Shakespeare model; train.py's defaults are smaller
    block_size: int = 256
    vocab_size: int = 50304
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    d_state: int = 16          # d_s, the SSM channel width per head (even)
    attention: str = 'sisa'    # 'sisa' or 'softmax'
    dropout: float = 0.0
    bias: bool = False         # bias in Linear layers
    d_ff: int = 0              # the Transformer's SwiGLU width (0: 8d/3 rounded up to 8); SISA shrinks its own to match
    kernel: str = 'auto'       # SISA attention: 'auto', 'triton' or 'sdpa' (see fused_kernel)
    sisa_offset: str = 'exact' # 'exact', or 'paper': the paper's clamped offset (paper_attention), an ablation
    short_conv: int = 0        # width of a causal convolution before each attention (ShortConv); 0: none

    def __post_init__(self):
        for name, allowed in (('attention', ('sisa', 'softmax')), ('kernel', ('auto', 'triton', 'sdpa')),
                              ('sisa_offset', ('exact', 'paper'))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.d_ff < 0:
            raise ValueError(f"d_ff must be >= 0 (0: 8 n_embd / 3 rounded up to a multiple of 8), got {self.d_ff}")
        if self.short_conv < 0 or self.short_conv == 1:
            raise ValueError(f"short_conv must be 0 (none) or a width >= 2, got {self.short_conv}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"n_embd // n_head ({self.n_embd // self.n_head}) must be even for RoPE")
        if self.d_state < 2 or self.d_state % 2 != 0:
            raise ValueError(f"d_state must be even and >= 2 (pairs are rotated), got {self.d_state}")
        if self.ffn_hidden() < 1:  # SISA's SSM costs more than the Transformer's SwiGLU holds
            d_ff = self.d_ff or 8 * ((8 * self.n_embd // 3 + 7) // 8)
            raise ValueError(f"d_state={self.d_state} leaves SISA no SwiGLU units to match the Transformer's "
                             f"{d_ff}: lower d_state or raise d_ff or n_embd")

    def ssm_widths(self):
        """Output widths of the SSM projections per layer: B, C, a, theta (empty for softmax)."""
        if self.attention != 'sisa':
            return []
        h, d_s = self.n_head, self.d_state
        return [h * d_s, h * d_s, h, h * d_s // 2]

    def ffn_hidden(self):
        """SwiGLU width. The baseline uses d_ff, or 8d/3 (rounded up to 8), the usual match for a 4d GELU MLP.
        SISA gives back what its SSM projections cost, so both models have the same size:
        2 d h d_s + d h + h + d h d_s / 2 + h parameters per layer (W_B, W_C, w_a, b_a, W_theta, lambda),
        at 3d a SwiGLU unit, rounded to whole units (a layer's two counts differ by at most half a unit)."""
        d = self.n_embd
        d_ff = self.d_ff or 8 * ((8 * d // 3 + 7) // 8)
        ssm = sum(self.ssm_widths())
        if ssm:
            extra = d * ssm + (ssm if self.bias else 0) + 2 * self.n_head  # + b_a, lambda_raw
            d_ff -= round(extra / (3 * d + (2 if self.bias else 0)))  # one unit of d_ff costs 3d (+2 biases)
        return d_ff


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.d_state = config.d_state
        self.sisa = config.attention == 'sisa'
        self.dropout = config.dropout
        self.kernel = config.kernel
        self.sisa_offset = config.sisa_offset
        # one projection for q, k, v and one for SISA's B, C, a, theta (ssm_inputs): two matmuls, not seven.
        # Not one for all: inductor would evaluate the rotation's backward for q, k and v too (docs/performance.md)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        if self.sisa:
            self.ssm_widths = config.ssm_widths()
            self.c_ssm = nn.Linear(config.n_embd, sum(self.ssm_widths), bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if self.sisa:
            # b_a = -5: alpha = exp(-softplus(-5)) ~ 0.9933, a half-life of about 100 tokens
            # (with bias=True, c_ssm's bias on a's column adds a second b_a: redundant, harmless)
            self.a_bias = nn.Parameter(torch.full((config.n_head,), -5.0))
            # lambda = softplus(lambda_raw) ~ 0.31, fp32 under autocast too (a test holds it)
            self.lambda_raw = nn.Parameter(torch.full((config.n_head,), math.log(math.expm1(0.31))))
        self.record_stats = False  # evaluate turns this on to read SISA's diagnostics
        self.stats, self.stats_dtype = None, None

    def reset_ssm_parameters(self):
        """Paper's init of c_ssm's rows that differ from GPT-2's: w_a = 0 (every token starts with the same decay),
        W_theta small. b_a and lambda get theirs where they are made, in __init__."""
        wB, wC, wa, wtheta = self.ssm_widths
        with torch.no_grad():
            W = self.c_ssm.weight  # (wB + wC + wa + wtheta, d)
            o = wB + wC
            W[o:o + wa].zero_()
            nn.init.normal_(W[o + wa:o + wa + wtheta], std=0.01)

    def project(self, x, start=0):
        """q, k, v (RoPE at positions start, start + 1, ...) and, for SISA, ssm_inputs: all a score needs."""
        b, l, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (t.view(b, l, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (b, h, l, d_h)
        angles = rope_angles(torch.arange(start, start + l, device=x.device), self.head_dim)
        q, k = rotate(q, angles).type_as(v), rotate(k, angles).type_as(v)
        if not self.sisa:
            return q, k, v, None
        pad = -self.c_ssm.out_features % 64 if x.is_cuda else 0  # 492 -> 512 at 152M; see padded_linear
        u = padded_linear(x, self.c_ssm, pad_out=pad)                # (b, l, h (2 d_s + 1 + d_s/2))
        return q, k, v, ssm_inputs(u, self.a_bias, self.lambda_raw, self.d_state)

    def forward(self, x, cache=None):
        b, l, d = x.shape
        start = cache.get('len', 0) if cache is not None else 0  # position of x's first token
        q, k, v, ssm = self.project(x, start)
        if not self.sisa:
            if cache is not None:
                k, v = self.update_cache(cache, k=k, v=v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=start == 0)
        else:
            C, B, log_alpha, theta, lam = ssm
            if self.record_stats:
                self.record(log_alpha, lam, q.dtype, C, B)
            if cache is None:
                y = sisa_attention(q, k, v, C, B, log_alpha, theta, lam,
                                   dropout_p=self.dropout if self.training else 0.0, kernel=self.kernel,
                                   sisa_offset=self.sisa_offset)
            else:
                y = self.cached_sisa(cache, q, k, v, C, B, log_alpha, theta, lam)
        y = y.transpose(1, 2).contiguous().view(b, l, d)
        return self.resid_dropout(self.c_proj(y))

    def update_cache(self, cache, **new):
        """Append new entries along the sequence axis; return the whole cached tensors."""
        for name, t in new.items():
            cache[name] = torch.cat([cache[name], t], dim=2) if name in cache else t
        return [cache[name] for name in new]

    def cached_sisa(self, cache, q, k, v, C, B, log_alpha, theta, lam):
        """SISA for generation with a cache of keys, values, g and R(Phi) B. A cached key cannot carry
        a sequence-wide offset (the sequence keeps growing), so each new step uses its own query's g_i:
        exp(g_i - g_j) <= 1 for every past key, always in range. The prompt goes through sisa_attention.
        """
        if 'len' not in cache:  # prefill
            y = sisa_attention(q, k, v, C, B, log_alpha, theta, lam, kernel=self.kernel)
            g, _, RB = ssm_channels(C, B, log_alpha, theta)
            self.update_cache(cache, k=k, v=v, RB=RB)
            cache['g'], cache['phi_last'] = g, theta.float().sum(dim=2, keepdim=True)
            return y
        g_i = cache['g'][..., -1:] + log_alpha                   # (b, h, 1)
        phi_i = cache['phi_last'] + theta.float()                 # (b, h, 1, d_s/2)
        cache['phi_last'] = phi_i
        cache['g'] = torch.cat([cache['g'], g_i], dim=-1)          # (b, h, n)
        k, v, RB = self.update_cache(cache, k=k, v=v, RB=rotate(B.float(), phi_i))
        s = channel_scale(lam, self.head_dim, lam.dtype)
        # the offset c = g_i: exp(g_i - c) = 1 on the query side, exp(g_i - g_j) <= 1 on the keys'
        sCbar = s * rotate(C.float(), phi_i)                                   # (b, h, 1, d_s)
        sBbar = s * (g_i[..., None] - cache['g'][..., None]).exp() * RB         # (b, h, n, d_s)
        Qhat = torch.cat([q, sCbar.to(q.dtype)], dim=-1)
        Khat = torch.cat([k, sBbar.to(k.dtype)], dim=-1)
        return sdpa(Qhat, Khat, v, scale=1 / math.sqrt(self.head_dim))

    @torch.no_grad()
    def record(self, log_alpha, lam, dtype, C, B):
        """Keep this forward's diagnostics as one tensor, read by diagnostics(): a read waits for the GPU, so
        evaluate reads every batch's at once at its end (and a CUDA graph can capture this)."""
        span = (-log_alpha[..., 1:]).sum(-1).max()  # nats of decay across the sequence (g_0 - g_last), any head's most
        half_life = math.log(2) / -log_alpha.mean(dim=(0, 2))
        # the largest entry of lambda sqrt(d_h) R(Phi) C and R(Phi) B, which the fused kernel reads in fp16
        # beside 16-bit q (sisa_kernel._launch): at most the norm of its pair, which the rotation keeps
        pairs = lambda x: x.float().unflatten(-1, (-1, 2)).norm(dim=-1).amax(dim=(0, 2, 3))  # (h,)
        operand = torch.maximum(lam.float() * self.head_dim ** 0.5 * pairs(C), pairs(B)).max()
        self.stats = torch.cat([lam.float(), half_life.float(), span.float()[None], operand[None]])
        self.stats_dtype = dtype

    def diagnostics(self, values=None):
        """record's values (the last recorded, or a list of them) as lambda and the mean decay half-life per
        head, the largest decay span, whether the chunked SDPA form needs chunks for it in the forward's dtype,
        and the bound on the importance's largest fp16 operand in the fused kernel."""
        values = self.stats.tolist() if values is None else values
        h = (len(values) - 2) // 2
        return dict(lam=values[:h], half_life=values[h:2 * h], span=values[-2],
                    chunked=values[-2] > max_decay_span(self.stats_dtype), operand=values[-1])


class MLP(nn.Module):
    """SwiGLU: (silu(x W_gate) * x W_up) W_down."""

    def __init__(self, config):
        super().__init__()
        self.d_ff = config.ffn_hidden()
        self.c_fc = nn.Linear(config.n_embd, 2 * self.d_ff, bias=config.bias)  # gate and up, fused
        self.c_proj = nn.Linear(self.d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        pad = -self.d_ff % 8 if x.is_cuda else 0  # see padded_swiglu
        return self.dropout(padded_swiglu(x, self.c_fc, self.c_proj, pad))


class ShortConv(nn.Module):
    """x plus a depthwise causal convolution of x over its last `width` tokens. Off by default; Zoology's
    associative-recall models put one before each attention: it hands every token its predecessors,
    which attention alone has to learn to fetch. Zero weights at init: the identity."""

    def __init__(self, d, width):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, 1, width))

    def forward(self, x, cache=None):
        # the width - 1 tokens before x: from the cache when decoding, else zeros (x starts the sequence)
        before = cache.get('conv') if cache is not None else None
        if before is None:
            before = x.new_zeros(x.size(0), self.weight.size(-1) - 1, x.size(-1))
        xs = torch.cat([before, x], dim=1)                      # (b, width - 1 + l, d)
        if cache is not None:
            cache['conv'] = xs[:, xs.size(1) - before.size(1):]
        # y_t = sum_k w_k xs_(t+k): F.conv1d with groups=d written as shifted copies, which torch.compile
        # fuses into one elementwise kernel
        w = self.weight[:, 0].to(x.dtype)                        # (d, width)
        return x + sum(xs[:, k:k + x.size(1)] * w[:, k] for k in range(w.size(1)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.conv = ShortConv(config.n_embd, config.short_conv) if config.short_conv else None
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x_norm = self.ln_1(x)
        if self.conv is not None:
            x_norm = self.conv(x_norm, cache)
        x = x + self.attn(x_norm, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.RMSNorm(config.n_embd, eps=1e-6),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):  # GPT-2's scaled init of the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for block in self.transformer.h:
            if block.attn.sisa:
                block.attn.reset_ssm_parameters()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        """Number of parameters (the tied embedding counted once; RoPE has none)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None):
        """idx (b, l) token ids -> logits (b, l, V) and the mean cross-entropy if targets are given.

        Without targets only the last position's logits are computed, (b, 1, V).
        cache: a list of one dict per layer (see new_cache) for incremental decoding.
        """
        b, l = idx.size()
        start = cache[0].get('len', 0) if cache else 0
        if start and l > 1:  # a new token's attention to the cache has no causal mask within its own input
            raise ValueError("after the prompt, cached decoding takes one token at a time")
        if start + l > self.config.block_size:
            raise ValueError(f"input length {start + l} exceeds block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx))  # (b, l, d)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache[i] if cache is not None else None)
        for layer_cache in cache or []:
            layer_cache['len'] = start + l
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def new_cache(self):
        return [{} for _ in range(self.config.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, on_token=None):
        """Sample max_new_tokens tokens after idx (b, l). temperature=0 picks the argmax.
        on_token, if given, sees each new (b, 1) token as it comes (sample.py prints them).

        With use_cache, each new token costs one step over the cached keys, O(l),
        instead of a full forward. Past block_size the context is cropped to the
        last block_size tokens, as in nanoGPT; a cropped context changes every
        layer's keys, so from then on each step is a full forward of the window.
        """
        use_cache = use_cache and self.config.sisa_offset == 'exact'  # the paper's offset needs the whole sequence
        cache = None
        for _ in range(max_new_tokens):
            if idx.size(1) > self.config.block_size:
                cache = None  # the window slides: rebuild from the cropped context
            if use_cache and cache is not None:
                logits, _ = self(idx[:, -1:], cache=cache)
            else:
                idx_cond = idx[:, -self.config.block_size:]
                cache = self.new_cache() if use_cache and idx.size(1) < self.config.block_size else None
                logits, _ = self(idx_cond, cache=cache)
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            if on_token:
                on_token(idx_next)
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on weights of 2 or more dimensions (the matrices, ShortConv's kernels), not
        on norms, b_a or lambda_raw."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
        ]
        use_fused = device_type == 'cuda'
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=use_fused)


# -----------------------------------------------------------------------------
# Backend workarounds: the same numbers, in the shapes the fast kernels want.

def sdpa(q, k, v, **kwargs):
    """F.scaled_dot_product_attention, for keys wider than values and for masked calls on CUDA.

    CPU's fused kernel wants v as wide as q and k, or falls back to the slower math path,
    so on the CPU v gets zero columns, which add nothing to the output, dropped after.
    On CUDA a call with attn_mask (the chunked form's) runs the math backend (below).
    """
    d_v = v.size(-1)
    if q.device.type == 'cuda' and kwargs.get('attn_mask') is not None:
        # the chunks' masked calls came back NaN from the default CUDA dispatch, and "misaligned
        # address" from the memory-efficient kernel (torch 2.11): the math kernel is exact
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if q.device.type == 'cpu' and q.size(-1) > d_v:
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.size(-1) - d_v)), **kwargs)[..., :d_v]
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def padded_linear(x, layer, pad_out=0):
    """layer(x), computed with pad_out zero rows appended to the weight (cut off the output): the
    same numbers, in a width cuBLAS runs fast. The SSM projection's width, h (2 d_s + 1 + d_s / 2),
    is rarely one (CausalSelfAttention.project pads it to a multiple of 64 on CUDA); padded_swiglu
    does the same for the SwiGLU (docs/performance.md)."""
    weight, bias = layer.weight, layer.bias
    if pad_out:
        weight = F.pad(weight, (0, 0, 0, pad_out))
        bias = None if bias is None else F.pad(bias, (0, pad_out))
    y = F.linear(x, weight, bias)
    return y[..., :layer.out_features] if pad_out else y


def padded_swiglu(x, c_fc, c_proj, pad=0):
    """c_proj(silu(gate) * up), where gate and up are c_fc(x)'s halves, computed with pad hidden
    units of zero weights appended to each half: they are exactly 0 (silu(0) * 0), so the numbers
    are the same, and every product is as wide as padded_linear's."""
    w_fc, b_fc, w_proj = c_fc.weight, c_fc.bias, c_proj.weight
    if pad:
        w_fc = F.pad(w_fc.unflatten(0, (2, -1)), (0, 0, 0, pad)).flatten(0, 1)
        b_fc = None if b_fc is None else F.pad(b_fc.unflatten(0, (2, -1)), (0, pad)).flatten()
        w_proj = F.pad(w_proj, (0, pad))
    gate, up = F.linear(x, w_fc, b_fc).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_proj, c_proj.bias)
