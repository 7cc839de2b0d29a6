"""Exercise set 10: FP8 training.

Fine-grained E4M3 quantisation (1x128 activation tiles, 128x128 weight blocks) and the
Tensor Cores' limited-precision accumulator with promotion to FP32 every N_C = 128
elements. References: ``minidsv3.fp8`` (quantize, fp8_matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ..fp8 import E4M3, E4M3_MAX, FP8Tensor, fp8_matmul, quantize, round_mantissa
from .compare import expect_close, expect_tuple
from .core import Fail, call, task

SET = "10_fp8"


def _amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The largest |x| of every ``block`` of x (zero-padded at the edges)."""
    rows, cols = block
    padded = F.pad(x.abs(), (0, -x.shape[1] % cols, 0, -x.shape[0] % rows))
    return rearrange(padded, "(r a) (c b) -> r c a b", a=rows, b=cols).amax(dim=(-2, -1))


def _scale_of(amax: torch.Tensor, divide: bool = True, guard: bool = True) -> torch.Tensor:
    scale = amax / E4M3_MAX if divide else amax.clone()
    return torch.where(amax > 0, scale, torch.ones_like(scale)) if guard else scale


def _check_quantized(fn, x: torch.Tensor, block: tuple[int, int], case: str,
                     scale_variants: list) -> None:
    got = call(fn, x.clone(), case=case)
    q, scale = expect_tuple(got, ["q", "scale"], "result")
    ref = quantize(x, block)
    amax = _amax(x, block)
    expect_close(scale, ref.scale, "scale", case, rtol=1e-6, atol=0.0, variants=[
        (_scale_of(amax, guard=False), "an all-zero tile/block got scale 0, so q = 0 / 0 = "
                                       "NaN: give it scale 1 (any scale maps zeros to 0)"),
        (_scale_of(amax, divide=False), "scale = amax: forgot to divide by 448, the largest "
                                        "E4M3 value, so the values use a tiny part of the range"),
        (ref.scale * E4M3_MAX * E4M3_MAX, "scale = amax * 448: divide amax by 448 instead"),
        *scale_variants,
    ])
    if not isinstance(q, torch.Tensor) or q.dtype != E4M3:
        kind = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise Fail(f"q: expected a tensor of dtype torch.float8_e4m3fn, got {kind}: cast "
                   f"(x / scale).to(torch.float8_e4m3fn) (case: {case})")
    # One E4M3 step of slack: x / scale and x * (1 / scale) may round differently.
    expect_close(q.float(), ref.q.float(), "q", case, rtol=0.13, atol=2.0 ** -9, variants=[
        (x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float(), "q is x itself cast to E4M3: divide "
                                                        "each tile by its scale first"),
    ])


@task(SET, "quantize_tiles", references=[quantize], hints=[
    "Each row of x is cut into tiles of 128 consecutive values along K; the last tile is "
    "narrower when K is not a multiple of 128. Zero-padding x to a multiple of 128 changes no "
    "tile's amax.",
    "Pad with F.pad(x, (0, -K % 128)), view it as (M, K' / 128, 128) and take abs().amax(-1): "
    "that is amax, (M, ceil(K / 128)). scale = amax / 448, but 1 where amax == 0.",
    "q = padded / scale[..., None], clamped to [-448, 448], reshaped back to (M, K'), cropped "
    "to [:, :K] and cast with .to(torch.float8_e4m3fn).",
])
def check_quantize_tiles(fn) -> int:
    gen = torch.Generator().manual_seed(100)
    x_zero = torch.randn(3, 384, generator=gen)
    x_zero[1, 128:256] = 0  # an all-zero tile
    x_out = torch.randn(4, 300, generator=gen)
    x_out[2, 5] = 1e3  # an outlier: only its own tile gets the coarse scale
    cases = [
        (torch.randn(5, 256, generator=gen) * 3, "x (5, 256): two whole tiles per row"),
        (x_out, "x (4, 300) with an outlier: the last tile has 44 values"),
        (x_zero, "x (3, 384) with an all-zero tile in row 1"),
        (torch.randn(2, 100, generator=gen) * 1e-3, "x (2, 100): K < 128, one narrow tile"),
    ]
    for x, case in cases:
        M, K = x.shape
        _check_quantized(fn, x, (1, 128), case, [
            (_scale_of(_amax(x, (1, K))), "one scale per row: the tiles are 1 x 128, so each "
                                          "row has ceil(K / 128) scales"),
            (_scale_of(_amax(x, (1, K)))[:, 0], "one scale per row: the tiles are 1 x 128, so "
                                                "each row has ceil(K / 128) scales"),
            (_scale_of(_amax(x, (128, 1))), "tiles along M: the 128 values of a tile run along "
                                            "K, the GEMM's inner dimension (a row of x)"),
            (_scale_of(_amax(x, (128, 1))).T, "tiles along M: the 128 values of a tile run "
                                              "along K, the GEMM's inner dimension"),
        ])
    return len(cases)


@task(SET, "quantize_blocks", references=[quantize], hints=[
    "A weight shares one scale per 128 x 128 block: rows 128 i .. 128 i + 127 and columns "
    "128 j .. 128 j + 127. Blocks on the right and bottom edges may be smaller.",
    "Zero-pad both dimensions to multiples of 128: F.pad(w, (0, -C % 128, 0, -R % 128)), then "
    "rearrange(padded, '(r a) (c b) -> r c a b', a=128, b=128).",
    "amax over the last two axes gives (ceil(R / 128), ceil(C / 128)); scale = amax / 448 (1 "
    "for an all-zero block); q = blocks / scale[..., None, None], clamped, rearranged back "
    "with 'r c a b -> (r a) (c b)', cropped to [:R, :C], cast to E4M3.",
])
def check_quantize_blocks(fn) -> int:
    gen = torch.Generator().manual_seed(101)
    w_zero = torch.randn(256, 256, generator=gen) * 0.02
    w_zero[128:, :128] = 0  # an all-zero block
    cases = [
        (torch.randn(256, 384, generator=gen) * 0.02, "w (256, 384): 2 x 3 whole blocks"),
        (torch.randn(200, 300, generator=gen), "w (200, 300): ragged blocks at both edges"),
        (w_zero, "w (256, 256) with an all-zero block"),
        (torch.randn(130, 64, generator=gen), "w (130, 64): K < 128, a 2-row last block"),
    ]
    for w, case in cases:
        R, C = w.shape
        variants = [
            (_scale_of(_amax(w, (1, 128))), "1 x 128 tiles: those are for activations; a weight "
                                            "has one scale per 128 x 128 block"),
            (_scale_of(_amax(w.T, (128, 128))), "transposed: the scale grid is (ceil(R / 128), "
                                                "ceil(C / 128)), block row first"),
            (_scale_of(_amax(w, (R, C))), "one scale for the whole matrix (per-tensor scaling): "
                                          "use one per 128 x 128 block"),
            (_scale_of(_amax(w, (R, C)))[0, 0], "one scale for the whole matrix (per-tensor "
                                                "scaling): use one per 128 x 128 block"),
        ]
        if R % 128 == 0 and C % 128 == 0:  # '(a r) (b c)': every (R/128)-th row, not a block
            strided = rearrange(w.abs(), "(a r) (b c) -> r c a b", a=128, b=128)
            variants.append((_scale_of(strided.amax(dim=(-2, -1))),
                             "strided blocks: a block is 128 *consecutive* rows and columns; "
                             "split with '(r a) (c b)', a=128, b=128, not '(a r) (b c)'"))
        _check_quantized(fn, w, (128, 128), case, variants)
    return len(cases)


def _accumulate(a: torch.Tensor, b: torch.Tensor, bits: int, promote_every, chunk: int,
                reset: bool = True, round_each_chunk: bool = True) -> torch.Tensor:
    """The accumulator with one mistake or the other, for the diagnoses."""
    products = F.pad(a.double() * b.double(), (0, -a.shape[0] % chunk)).view(-1, chunk)
    per = promote_every // chunk if promote_every is not None else products.shape[0]
    running = torch.zeros((), dtype=torch.float64)
    fp32 = torch.zeros((), dtype=torch.float32)
    for c, chunk_sum in enumerate(products.sum(-1)):
        running = running + chunk_sum
        if round_each_chunk:
            running = round_mantissa(running, bits)
        if (c + 1) % per == 0 or c + 1 == products.shape[0]:
            fp32 = fp32 + round_mantissa(running, bits).float()
            if reset:
                running = torch.zeros((), dtype=torch.float64)
    return fp32


@task(SET, "promoted_dot", references=[fp8_matmul], hints=[
    "Multiply a and b in float64 (exact), pad the products with zeros to a multiple of "
    "`chunk` and sum each chunk of 32: one MMA instruction's worth.",
    "Keep a float64 running sum: after adding each chunk sum, round it with "
    "round_mantissa(running, mantissa_bits). This is the Tensor Cores' ~14-bit register.",
    "Every promote_every // chunk chunks (and after the last chunk) add running.float() into a "
    "float32 accumulator and reset running to 0. promote_every=None: only after the last "
    "chunk. Return the float32 accumulator as a 0-d tensor.",
])
def check_promoted_dot(fn) -> int:
    gen = torch.Generator().manual_seed(102)

    def operand(n: int, positive: bool) -> FP8Tensor:  # power-of-two scales: exact q * scale
        x = torch.randn(1, n, generator=gen)
        return quantize(x.abs() if positive else x, (1, 128), power_of_two=True)

    cases = [  # (K, mantissa_bits, promote_every, positive operands)
        (4096, 14, 128, True), (1024, 10, 128, False), (1000, 12, 256, True),
        (2048, 14, None, True), (20, 14, 128, True), (512, 23, 128, False),
    ]
    for K, bits, every, positive in cases:
        A, B = operand(K, positive), operand(K, positive)
        a, b = A.dequantize()[0], B.dequantize()[0]
        case = (f"K={K}, mantissa_bits={bits}, promote_every={every}, "
                f"{'positive' if positive else 'random-sign'} operands")
        expected = fp8_matmul(A, B, bits, every, 32)[0, 0]
        got = call(fn, a.clone(), b.clone(), bits, every, 32, case=case)
        if isinstance(got, torch.Tensor) and got.numel() == 1 and got.dim() > 0:
            got = got.reshape(())
        expect_close(got, expected, "dot", case, atol=0.0, rtol=2e-7, variants=[
            (fp8_matmul(A, B, bits, None, 32)[0, 0],
             "never promoted: add the running sum into the FP32 accumulator every "
             "promote_every elements, not only at the end"),
            (_accumulate(a, b, bits, every, 32, reset=False),
             "promoted without resetting: after adding the running sum into the FP32 "
             "accumulator, restart it at zero, or it is counted again"),
            (_accumulate(a, b, bits, every, 32, round_each_chunk=False),
             "rounded only at promotion: the limited register rounds the running sum to "
             "mantissa_bits after *every* chunk is added"),
            ((a.double() @ b.double()).float(), "no rounding at all: this is the exact dot "
             "product; round the running sum to mantissa_bits after each chunk"),
        ])
        if isinstance(got, torch.Tensor) and got.dtype != torch.float32:
            raise Fail(f"dot: return a float32 tensor (the FP32 accumulator), got {got.dtype} "
                       f"(case: {case})")
    return len(cases)
