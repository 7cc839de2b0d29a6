"""FP8 mixed-precision training, simulated exactly on a CPU (V3 report sec. 3.3, Figs. 6-7).

DeepSeek-V3 runs the three GEMMs of every linear layer in FP8 -- the forward (Fprop),
the gradient of the input (Dgrad) and the gradient of the weight (Wgrad) -- while master
weights, weight gradients and optimizer state stay in higher precision. Three ideas make
E4M3 (4 exponent bits, 3 mantissa bits, largest value 448) precise enough:

* fine-grained quantisation (sec. 3.3.2, Fig. 7a): one scale per 1x128 *tile* of an
  activation (along the GEMM's inner dimension K) and per 128x128 *block* of a weight,
  scale = amax / 448, so an outlier only coarsens its own 128 values; the baseline it
  replaces is one scale per tensor. The later releases round scales up to powers of two
  (UE8M0), which makes multiplying by a scale exact;
* E4M3 for every GEMM input, gradients included: small tiles leave no need for E5M2;
* increased accumulation precision (Fig. 7b): the Tensor Cores keep only about 14 bits of
  the running sum's mantissa, so every N_C = 128 elements along K the partial sum is
  promoted to an FP32 accumulator.

No CPU has FP8 Tensor Cores, so ``fp8_matmul`` simulates one, with this model:

    operands   the dequantised FP8 values q * scale (float32);
    products   exact (float64 holds the product of two float32 numbers exactly);
    K chunks   the products are summed ``chunk`` at a time (32: the K of one Hopper FP8
               MMA instruction), each chunk in float64 -- exact to 2^-53, far below
               everything else here;
    accumulator  after each chunk is added, the running sum is rounded to
               ``mantissa_bits`` bits (round to nearest, ties to even);
    promotion  every ``promote_every`` elements of K (None: never) the running sum is
               added to an FP32 accumulator (one float32 addition) and restarts at zero.

Real kernels apply the tile and block scales at promotion instead (one pair of scales per
128 elements of K); where the scale enters changes where the rounding boundaries lie, not
how large the rounding errors are, and keeping it in the operands lets per-tensor scaling
and the unpromoted accumulator run through the same code.

``FP8Linear`` puts all three GEMMs of a bias-free linear through ``fp8_matmul``, saving its
input for the backward in FP8; ``convert_to_fp8`` swaps it into a model where the report
does, keeping the embedding, the output head, the router, the norms and the attention
core in higher precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .hf import dequantize_fp8

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448.0
TILE = 128  # the tile length, the weight block's side and N_C, the promotion interval
FP32_MANTISSA_BITS = 23

Block = tuple[int, int]  # (rows, cols) of the region that shares one scale


# ---------------------------------------------------------------- quantisation

@dataclass
class FP8Tensor:
    """A matrix in FP8: E4M3 values ``q`` (R, C) and one float32 ``scale`` per ``block``.

    ``scale`` has ceil(R / rows) x ceil(C / cols) entries; x is approximately q * scale.
    """

    q: torch.Tensor
    scale: torch.Tensor
    block: Block

    def dequantize(self) -> torch.Tensor:
        """q * scale in float32, (R, C): the values the simulated GEMM multiplies (exactly
        q * scale for power-of-two scales, else rounded to float32: a 2^-24 change)."""
        return dequantize_fp8(self.q, self.scale, self.block)

    @property
    def T(self) -> FP8Tensor:
        """The transpose, with the same scales: W's 128x128 blocks quantise W^T too."""
        return FP8Tensor(self.q.T, self.scale.T, self.block[::-1])


def power_of_two_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale (UE8M0: a scale that is only an exponent).

    Rounding *up* keeps x / scale <= 448: no value overflows E4M3.
    """
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, 0.5 <= m < 1
    exact = (mantissa == 0.5).to(exponent.dtype)  # already a power of two: keep it
    return torch.ldexp(torch.ones_like(scale), exponent - exact)


def quantize(x: torch.Tensor, block: Block, power_of_two: bool = False) -> FP8Tensor:
    """E4M3 values and one scale per ``block`` of a matrix x (R, C): scale = amax / 448.

    Blocks at the edges (R or C not a multiple of the block) are zero-padded first, which
    changes no block's amax; an all-zero block gets scale 1 (any scale maps it to 0).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize takes a matrix (R, C); got shape {tuple(x.shape)}: "
                         "flatten the leading dimensions first")
    rows, cols = block
    R, C = x.shape
    padded = F.pad(x.float(), (0, -C % cols, 0, -R % rows))  # (R', C'), whole blocks
    blocks = rearrange(padded, "(r a) (c b) -> r c a b", a=rows, b=cols)  # (R'/a, C'/b, a, b)
    amax = blocks.abs().amax(dim=(-2, -1))  # (R'/a, C'/b)
    scale = amax / E4M3_MAX
    if power_of_two:
        scale = power_of_two_ceil(scale)
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))  # no 0 / 0
    # x / scale may exceed 448 by a rounding error of the division: clamp, never overflow.
    scaled = (blocks / scale[..., None, None]).clamp(-E4M3_MAX, E4M3_MAX)
    q = rearrange(scaled, "r c a b -> (r a) (c b)")[:R, :C]  # (R, C): padding cropped
    return FP8Tensor(q.to(E4M3), scale, block)


# ---------------------------------------------------------------- the simulated GEMM

def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to ``bits`` mantissa bits (after the leading one): to nearest, ties to even.

    float32 or float64. On the integer view of a float the mantissa is the low bits; adding
    half a unit of the kept last bit (less one, plus that bit: ties go to even) carries into
    the kept bits exactly when rounding up, and the dropped bits are then cleared. A carry
    out of the mantissa correctly bumps the exponent (0x1.fff... rounds to 2.0). The sign
    bit is untouched, so negative numbers round symmetrically.
    """
    layouts = {torch.float32: (torch.int32, FP32_MANTISSA_BITS), torch.float64: (torch.int64, 52)}
    if x.dtype not in layouts:
        raise ValueError(f"round_mantissa takes float32 or float64, not {x.dtype}")
    ints, width = layouts[x.dtype]
    if not 1 <= bits <= width:
        raise ValueError(f"bits={bits}: a {x.dtype} mantissa has 1 to {width} bits")
    dropped = width - bits
    if dropped == 0:
        return x
    i = x.view(ints)
    i = i + ((1 << (dropped - 1)) - 1) + ((i >> dropped) & 1)
    return (i & -(1 << dropped)).view(x.dtype)  # -(1 << d) = the mask ...111000 of d zeros


def check_accumulator(mantissa_bits: int, promote_every: int | None, chunk: int) -> None:
    """Refuse an accumulator that ``fp8_matmul`` cannot model."""
    if not 1 <= mantissa_bits <= FP32_MANTISSA_BITS:
        raise ValueError(f"mantissa_bits={mantissa_bits} must be in [1, 23] (23 accumulates in "
                         "full FP32; more would not survive the promotion to FP32)")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    if promote_every is not None and (promote_every < 1 or promote_every % chunk):
        raise ValueError(f"promote_every={promote_every} must be None (never) or a positive "
                         f"multiple of chunk={chunk}")


def fp8_matmul(a: FP8Tensor, b: FP8Tensor, mantissa_bits: int = 14,
               promote_every: int | None = TILE, chunk: int = 32) -> torch.Tensor:
    """a @ b^T in float32 as an FP8 Tensor-Core GEMM computes it: a (M, K), b (N, K).

    Both operands are quantised along K, their shared inner dimension. The running sum
    keeps ``mantissa_bits`` bits and is promoted to FP32 every ``promote_every`` elements
    of K (None: only at the end); see the module docstring for the whole model.
    """
    (M, K), (N, K_b) = a.q.shape, b.q.shape
    if K != K_b:
        raise ValueError(f"inner dimensions differ: a is {(M, K)}, b is {(N, K_b)} (a @ b^T)")
    check_accumulator(mantissa_bits, promote_every, chunk)
    # Zero padding to whole chunks adds exact zeros, which change no rounding.
    a64 = F.pad(a.dequantize(), (0, -K % chunk)).double()
    b64 = F.pad(b.dequantize(), (0, -K % chunk)).double()
    a64 = rearrange(a64, "m (c k) -> c m k", k=chunk)  # (chunks, M, chunk)
    b64 = rearrange(b64, "n (c k) -> c k n", k=chunk)  # (chunks, chunk, N)
    chunk_sums = torch.bmm(a64, b64)  # (chunks, M, N): exact products, summed per chunk
    n_chunks = chunk_sums.shape[0]
    per_promotion = promote_every // chunk if promote_every is not None else n_chunks
    tensor_core = torch.zeros(M, N, dtype=torch.float64, device=a64.device)
    fp32 = torch.zeros(M, N, dtype=torch.float32, device=a64.device)
    for c in range(n_chunks):
        tensor_core = round_mantissa(tensor_core + chunk_sums[c], mantissa_bits)
        if (c + 1) % per_promotion == 0 or c + 1 == n_chunks:
            fp32 += tensor_core.float()  # exact cast (<= 23 bits); the addition rounds to FP32
            tensor_core.zero_()
    return fp32


# ---------------------------------------------------------------- FP8 linear layers

@dataclass(frozen=True)
class FP8Recipe:
    """How the FP8 GEMMs quantise and accumulate; the defaults are DeepSeek-V3's."""

    scaling: Literal["tile", "tensor"] = "tile"  # tile: 1x128 / 128x128; tensor: baseline
    power_of_two: bool = False  # scales rounded up to powers of two (UE8M0)
    mantissa_bits: int = 14  # what the Tensor Cores keep of the running sum
    promote_every: int | None = TILE  # N_C; None: the whole K in the Tensor Cores
    chunk: int = 32  # products summed before each rounding (one MMA instruction's K)

    def __post_init__(self):
        if self.scaling not in ("tile", "tensor"):
            raise ValueError(f"scaling={self.scaling!r}: use 'tile' (1x128 activation tiles, "
                             "128x128 weight blocks) or 'tensor' (one scale per tensor)")
        check_accumulator(self.mantissa_bits, self.promote_every, self.chunk)

    def _quantize(self, x: torch.Tensor, block: Block) -> FP8Tensor:
        if self.scaling == "tensor":  # one block covering the matrix (an empty one, too)
            block = (max(1, x.shape[0]), max(1, x.shape[1]))
        return quantize(x, block, self.power_of_two)

    def activation(self, x: torch.Tensor) -> FP8Tensor:
        """x (M, K) in 1 x 128 tiles along K, the GEMM's inner dimension."""
        return self._quantize(x, (1, TILE))

    def weight(self, w: torch.Tensor) -> FP8Tensor:
        """w (N, K) in 128 x 128 blocks."""
        return self._quantize(w, (TILE, TILE))

    def matmul(self, a: FP8Tensor, b: FP8Tensor) -> torch.Tensor:
        return fp8_matmul(a, b, self.mantissa_bits, self.promote_every, self.chunk)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with Fprop, Dgrad and Wgrad all FP8 GEMMs (report Fig. 6).

    Each GEMM quantises its operands along its own inner dimension:
        Fprop  y  = x W^T    inner K: x in 1x128 tiles, W in 128x128 blocks
        Dgrad  dx = dy W     inner N: dy in 1x128 tiles, W^T in the same 128x128 blocks
        Wgrad  dW = dy^T x   inner M (tokens): dy^T and x^T in 1x128 tiles along M,
                             i.e. 128x1 tiles of dy and x
    The input is saved for the backward as its FP8 tiles and scales, never in FP32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe):
        with torch.autocast(x.device.type, enabled=False):  # the simulation is float32/64
            x2 = x.reshape(-1, x.shape[-1])  # (M, K): every token is a row
            x_fp8, w_fp8 = recipe.activation(x2), recipe.weight(weight)
            y = recipe.matmul(x_fp8, w_fp8)  # (M, N)
        ctx.save_for_backward(x_fp8.q, x_fp8.scale, w_fp8.q, w_fp8.scale)
        ctx.blocks, ctx.recipe = (x_fp8.block, w_fp8.block), recipe
        ctx.dtypes, ctx.x_shape = (x.dtype, weight.dtype), x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)  # (..., N)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_q, x_scale, w_q, w_scale = ctx.saved_tensors
        x_fp8 = FP8Tensor(x_q, x_scale, ctx.blocks[0])
        w_fp8 = FP8Tensor(w_q, w_scale, ctx.blocks[1])
        recipe, (x_dtype, w_dtype) = ctx.recipe, ctx.dtypes
        grad_x = grad_w = None
        with torch.autocast(grad_y.device.type, enabled=False):
            dy = grad_y.reshape(-1, grad_y.shape[-1]).float()  # (M, N)
            if ctx.needs_input_grad[0]:  # Dgrad
                grad_x = recipe.matmul(recipe.activation(dy), w_fp8.T)  # (M, K)
                grad_x = grad_x.reshape(ctx.x_shape).to(x_dtype)
            if ctx.needs_input_grad[1]:  # Wgrad: x leaves its 1x128 tiles for tiles along M
                x_t = x_fp8.dequantize().T  # (K, M)
                grad_w = recipe.matmul(recipe.activation(dy.T), recipe.activation(x_t))  # (N, K)
                grad_w = grad_w.to(w_dtype)  # the FP32 master weight's gradient
        return grad_x, grad_w, None


class FP8Linear(nn.Module):
    """A bias-free linear layer whose three GEMMs run in (simulated) FP8.

    It holds the same FP32 master ``weight`` (out_features, in_features) as the
    ``nn.Linear`` it replaces, so state_dict keys, initialisation and optimizer are unchanged.
    """

    def __init__(self, weight: nn.Parameter, recipe: FP8Recipe = FP8Recipe()):
        super().__init__()
        self.weight = weight
        self.recipe = recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.recipe)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, recipe={self.recipe}"


# The GEMM-bearing linears of MLA, the dense, shared and routed SwiGLU experts, and the MTP
# projection. Not these: the embedding and the output head (lm_head), the router (Gate),
# the norms and the attention core (softmax(q k^T) v), which the report keeps in BF16/FP32.
FP8_PROJECTIONS = frozenset({
    "q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj", "eh_proj",
})


def convert_to_fp8(model: nn.Module, recipe: FP8Recipe = FP8Recipe()) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` named in FP8_PROJECTIONS by an FP8Linear
    sharing its weight; returns the model. Build the optimizer afterwards or before: the
    parameters are the same objects."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in FP8_PROJECTIONS and isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"{name} has a bias; FP8Linear is bias-free, as every "
                                     "DeepSeek-V3 projection is")
                setattr(module, name, FP8Linear(child.weight, recipe))
    return model
