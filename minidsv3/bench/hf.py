"""A training step of minidsv3 vs HF transformers' ``DeepseekV3ForCausalLM``: ``python -m
minidsv3.bench hf``.

transformers is not a dependency of minidsv3 (``pip install transformers``, or the
``compare`` extra, to run this). Without it, or with a version older than 5, the
benchmark prints one line saying so and exits 0.

1. The HF model is built from our ``ModelConfig`` (``hf_config_kwargs``) and given our
   weights the way a user would load the release: ``hf.save_pretrained`` writes them in
   the checkpoint layout and HF's own ``from_pretrained`` reads them back (it packs the
   per-expert matrices of the file into its fused expert tensors). Compared is our model
   less what HF's class does not train (``hf_equivalent``): no MTP module, and no
   sequence-wise balance loss, so that both losses are the plain next-token cross-entropy.
2. Both models then take one forward and backward pass on the same batch: their logits,
   losses and gradient norms must agree within float32 rounding, the proof that the two
   configs describe the same network. The largest differences are printed.
3. Full training steps -- forward with the loss, backward, gradient clipping to norm 1,
   AdamW(0.9, 0.95), zero_grad, and for minidsv3 the routing-bias update -- are timed on
   one random batch, interleaved step by step (minidsv3, HF, minidsv3 + MTP, minidsv3, ...)
   so that noise on a shared machine hits all alike; medians are reported. Our default
   model, with MTP and the balance loss, is timed too for reference: it does more work.

HF runs with ``attn_implementation="sdpa"`` by default, the fused attention kernel our
model uses too (``--attn-implementation eager`` is its plain matmul-softmax-matmul), and
with its default experts implementation, named in the output.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from ..config import ModelConfig
from ..hf import save_pretrained
from ..model import DeepSeekV3, set_seed
from ..scale import flops_per_token, parameter_counts
from ..train_setup import param_groups
from .train import MAX_PARAMETERS, add_step_options, matmul_peak, without_mtp

HF_CLASS = "DeepseekV3ForCausalLM"
MIN_TRANSFORMERS = 5  # major version: fused expert tensors, from_pretrained(dtype=...)
# float32 sums taken in another order differ by ~1e-6; one config field mapped wrongly
# (rope_interleave, routed_scaling_factor, norm_topk_prob, topk_group) moves the toy's
# logits by 0.3 or more.
TOLERANCE = 1e-4


def hf_equivalent(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` less what HF's DeepseekV3ForCausalLM does not train: MTP and the balance losses.

    HF builds no MTP module (it ignores num_nextn_predict_layers) and its loss is the
    next-token cross-entropy alone; routing-bias updates are left to the training loop.
    """
    return without_mtp(cfg).replace(aux_loss_alpha=0.0, expert_aux_loss_alpha=0.0)


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The ``DeepseekV3Config(**kwargs)`` of ``cfg``: its config.json plus what training states.

    ``to_hf_dict`` is the release's config.json; on top of it HF needs
    ``rope_interleave=True`` (our RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...,
    as the released weights expect) and ``use_cache=False`` (a training forward keeps no
    KV cache). The file's ``torch_dtype`` (the release's bfloat16) is dropped: the
    benchmark trains in float32.
    """
    if cfg.model_type != "deepseek_v3" or cfg.scoring_func != "sigmoid":
        raise ValueError(
            f"topk_method={cfg.topk_method!r}, scoring_func={cfg.scoring_func!r}: HF's {HF_CLASS} "
            "routes only as DeepSeek-V3 does (topk_method='noaux_tc', scoring_func='sigmoid')")
    kwargs = cfg.to_hf_dict()
    del kwargs["torch_dtype"]
    kwargs.update(rope_interleave=True, use_cache=False)
    return kwargs


def import_transformers() -> ModuleType | str:
    """The transformers module, or the line that says why it cannot be compared with.

    Imported only here, so that this module (and the suite) works without it.
    """
    try:
        import transformers
    except ImportError:
        return ("transformers is not installed: pip install transformers to compare minidsv3's "
                f"training step with HF's {HF_CLASS}; skipped")
    version = getattr(transformers, "__version__", "0")
    if int(version.split(".")[0]) < MIN_TRANSFORMERS:
        return (f"transformers {version} is too old: this comparison needs >= "
                f"{MIN_TRANSFORMERS}, whose {HF_CLASS} it was written against; "
                "pip install -U transformers to compare; skipped")
    return transformers


def load_into_hf(model: DeepSeekV3, transformers: ModuleType, attn: str) -> torch.nn.Module:
    """HF's model with ``model``'s weights, read from the checkpoint layout by HF itself."""
    # from_pretrained's progress bar over the tensors would fill the benchmark's output.
    transformers.utils.logging.disable_progress_bar()
    config = transformers.DeepseekV3Config(**hf_config_kwargs(model.cfg))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
            tmp, config=config, dtype=torch.float32,
            attn_implementation=attn, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched keys
    if problems:
        raise RuntimeError(f"{HF_CLASS} did not load our checkpoint exactly: {problems}")
    return hf.train()


@dataclass
class Contender:
    """One model in the race, with its optimizer and the seconds of its timed steps."""

    name: str
    model: torch.nn.Module
    loss: Callable[[], Any]  # () -> output with .loss and .logits, on the benchmark batch
    cfg: ModelConfig  # what it computes (for the FLOP count)
    seconds: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.1), lr=1e-3,
                                           betas=(0.9, 0.95))

    def step(self) -> float:
        """One full training step; returns its wall-clock seconds."""
        start = time.perf_counter()
        self.loss().loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        if isinstance(self.model, DeepSeekV3):  # our auxiliary-loss-free balancing
            for moe in self.model.moe_layers():
                moe.update_bias(0.001)
        return time.perf_counter() - start


def agreement(a: Contender, b: Contender) -> dict[str, float]:
    """Largest |difference| of logits, loss and gradient norm of one forward + backward."""
    outs, norms = [], []
    for c in (a, b):
        out = c.loss()
        out.loss.backward()
        norms.append(torch.nn.utils.get_total_norm(
            [p.grad for p in c.model.parameters() if p.grad is not None]))
        c.model.zero_grad(set_to_none=True)
        outs.append(out)
    if isinstance(a.model, DeepSeekV3):  # the forward counted expert loads: forget them
        for moe in a.model.moe_layers():
            moe.expert_load.zero_()
    return {"logits": (outs[0].logits - outs[1].logits).abs().max().item(),
            "loss": (outs[0].loss - outs[1].loss).abs().item(),
            "gradient norm": (norms[0] - norms[1]).abs().item()}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ModelConfig]:
    parser = argparse.ArgumentParser(
        prog="python -m minidsv3.bench hf", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_options(parser)
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa",
                        help="HF's attention: sdpa is the fused kernel minidsv3 uses too")
    args = parser.parse_args(argv)
    cfg = ModelConfig.preset(args.preset, vocab_size=args.vocab_size)
    try:
        hf_config_kwargs(cfg)
    except ValueError as e:
        parser.error(f"--preset {args.preset}: {e}")
    n_params = parameter_counts(cfg).total
    if n_params > MAX_PARAMETERS:
        parser.error(f"--preset {args.preset} has {n_params:,} parameters; this benchmark trains "
                     f"on the CPU and takes at most {MAX_PARAMETERS:,} (use --preset toy)")
    if not cfg.num_nextn_predict_layers < args.seq_len <= cfg.max_position_embeddings:
        parser.error(f"--seq-len {args.seq_len} must be in ({cfg.num_nextn_predict_layers}, "
                     f"max_position_embeddings={cfg.max_position_embeddings}]")
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    transformers = import_transformers()
    if isinstance(transformers, str):  # not installed, or too old: a clean skip
        print(transformers)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    same = hf_equivalent(cfg)
    set_seed(0)
    ours = DeepSeekV3(same)
    hf = load_into_hf(ours, transformers, args.attn_implementation)
    set_seed(0)
    ours_mtp = DeepSeekV3(cfg)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len))
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len))
    # HF shifts ``labels`` by one itself; ``shift_labels`` passes targets already aligned
    # with the inputs, as ours are (y[t] is the token after x[t]), so every position counts.
    contenders = [
        Contender("minidsv3", ours, lambda: ours(x, y), same),
        Contender(f"HF {HF_CLASS}", hf, lambda: hf(input_ids=x, labels=y, shift_labels=y), same),
        Contender("minidsv3 + MTP (default)", ours_mtp, lambda: ours_mtp(x, y), cfg),
    ]

    peak, n = matmul_peak()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, float32; matmul peak {peak / 1e9:,.1f} GFLOP/s "
          f"({n}x{n})")
    print(f"HF: attention {hf.config._attn_implementation!r}, experts "
          f"{getattr(hf.config, '_experts_implementation', 'eager')!r}")
    diff = agreement(contenders[0], contenders[1])
    print("minidsv3 (no MTP, no balance loss) vs HF, same weights and batch: max |diff| "
          + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()) + f" (tolerance {TOLERANCE:g})")
    if max(diff.values()) > TOLERANCE:
        print("the models disagree: the timings below would not compare the same network")
        return 1

    tokens = args.batch_size * args.seq_len
    print(f"batch {args.batch_size} x {args.seq_len} tokens; medians of {args.steps} steps "
          f"after {args.warmup} warm-up steps, interleaved; random token ids\n")
    for i in range(args.warmup + args.steps):
        for c in contenders:
            seconds = c.step()
            if i >= args.warmup:
                c.seconds.append(seconds)
    print(f"{'model':<30}{'params':>11}{'step ms':>9}{'tok/s':>9}{'GFLOP/s':>9}{'% peak':>8}")
    step = {}
    for c in contenders:
        step[c.name] = statistics.median(c.seconds)
        flops = tokens / step[c.name] * flops_per_token(c.cfg, args.seq_len).training
        n_params = sum(p.numel() for p in c.model.parameters())
        print(f"{c.name:<30}{n_params:>11,}{1e3 * step[c.name]:>9.1f}"
              f"{tokens / step[c.name]:>9,.0f}{flops / 1e9:>9.1f}{100 * flops / peak:>7.1f}%")
    hf_step = step[contenders[1].name]
    print(f"\nspeed minidsv3 / HF, the same network:       "
          f"{hf_step / step['minidsv3']:.2f}x (HF ms / minidsv3 ms; aim: >= 1.5x)")
    print(f"speed minidsv3 + MTP / HF (more work, for reference): "
          f"{hf_step / step[contenders[2].name]:.2f}x")
    return 0
