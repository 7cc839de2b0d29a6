"""ModelConfig: every number that defines a DeepSeek-V3-architecture model.

Field names are the ones of the released ``config.json`` (the HF layout), so a
config can be read from and written to that file unchanged. Presets:

* ``tiny``             -- a few thousand parameters, for unit tests;
* ``toy``              -- the model ``make train`` trains on Shakespeare on a CPU;
* ``deepseek-v3``      -- the released 671B configuration (build it on the meta device);
* ``deepseek-v2``      -- DeepSeek-V2 (236B): softmax gate, max-score expert groups, no bias;
* ``deepseek-v2-lite`` -- DeepSeek-V2-Lite (16B): softmax gate, no groups, no query LoRA.

The three released models share every module and differ in config only, so one code
path serves the family. ``from_dict`` reads both layouts of ``config.json``: the
release's (top-level ``rope_theta`` and ``rope_scaling``) and the one transformers >= 5
writes (one ``rope_parameters`` block with a ``rope_type``).

Validation runs at construction: a bad value raises ``ValueError`` naming the
field, the value and what is allowed, instead of failing deep inside a matmul.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")  # the release's routing rules
DEFAULT_ROPE_THETA = 10000.0  # what HF assumes when a file states no rope_theta
# The HF classes of the family (model_type -> architecture) and their tokenizers' special ids.
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
TOKEN_IDS = {"deepseek_v3": dict(bos_token_id=0, eos_token_id=1),
             "deepseek_v2": dict(bos_token_id=100000, eos_token_id=100001)}

# Upper bounds on what the model builds one ``nn.Module`` at a time. Building costs about
# 0.1 ms per module even on the meta device (the 671B release, 61,534 modules, takes ~6 s),
# so 10^6 layers or experts would run for an hour before failing or running out of memory.
# The bounds are ~16x the release's blocks and ~4x its experts: roomy for experiments, and
# at most about half a minute to build. Widths (hidden_size, vocab_size, ...) need no
# bound: on the meta device they cost nothing, and on a real device an impossible size
# fails at once, when its memory is allocated.
MAX_BLOCKS = 1024  # num_hidden_layers + num_nextn_predict_layers (release: 61 + 1)
MAX_ROUTED_EXPERTS = 2**16  # routed experts over all MoE blocks (release: 59 x 256 = 15,104)
# Multipliers (loss weights, routed_scaling_factor, YaRN's mscale) are at most a few units
# in every release (0.3, 1e-4, 2.5, 1.0). Up to COEFFICIENT_MAX the forward of the tiny and
# toy presets stays finite; far past it float32 overflows (1e300 made the loss inf).
COEFFICIENT_MAX = 1e6
# YaRN's betas count rotations over the original context (V3: 32 and 1). Their pair index
# ln(L / (2 pi beta)) overflows near 1e-308 and 1e308; this range keeps it finite with
# room to spare (past L / 2pi rotations every beta_fast selects the same pairs anyway).
YARN_BETA_RANGE = (1e-9, 1e9)


@dataclass
class RopeScaling:
    """YaRN context extension (V3 report sec. 4.3); the ``rope_scaling`` block of config.json."""

    factor: float = 40.0  # s: how much longer the extended context is than the original
    original_max_position_embeddings: int = 4096  # context length of pre-training
    beta_fast: float = 32.0  # dims rotating more than beta_fast times in the context keep RoPE
    beta_slow: float = 1.0  # dims rotating fewer than beta_slow times are fully interpolated
    mscale: float = 1.0  # attention-temperature coefficient (0.1*mscale*ln(s)+1)
    mscale_all_dim: float = 1.0  # same, applied to the softmax scale of all dims
    type: str = "yarn"  # only YaRN is used by DeepSeek-V3

    def __post_init__(self) -> None:
        if self.type != "yarn":
            raise ValueError(f"rope_scaling.type={self.type!r}: only 'yarn' is supported")
        _check_number("rope_scaling.factor", self.factor, 1, inclusive=True)
        _check_int("rope_scaling.original_max_position_embeddings",
                   self.original_max_position_embeddings, 1)
        low, high = YARN_BETA_RANGE
        for name in ("beta_fast", "beta_slow"):
            _check_number(f"rope_scaling.{name}", getattr(self, name), low, True, high)
        for name in ("mscale", "mscale_all_dim"):
            _check_number(f"rope_scaling.{name}", getattr(self, name), 0, True, COEFFICIENT_MAX)
        if not self.beta_fast > self.beta_slow:
            raise ValueError(
                f"rope_scaling.beta_fast={self.beta_fast}, beta_slow={self.beta_slow}: "
                "need beta_fast > beta_slow"
            )


# The keys a config.json rope_scaling block may hold: the fields above, plus the name
# newer HF files use for ``type``.
ROPE_SCALING_KEYS = {f.name for f in dataclasses.fields(RopeScaling)} | {"rope_type"}


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V3 model (HF ``config.json`` field names)."""

    vocab_size: int = 129280  # number of token ids
    hidden_size: int = 7168  # d: width of the residual stream
    intermediate_size: int = 18432  # hidden width of the dense SwiGLU FFN (first layers)
    moe_intermediate_size: int = 2048  # hidden width of one (fine-grained) expert
    num_hidden_layers: int = 61  # decoder blocks of the main model
    first_k_dense_replace: int = 3  # the first k blocks use a dense FFN instead of MoE
    num_attention_heads: int = 128  # n_h
    q_lora_rank: int = 1536  # d_c': query latent width; 0 = no query compression
    kv_lora_rank: int = 512  # d_c: joint key/value latent width (what is cached)
    qk_nope_head_dim: int = 128  # d_h: per-head query/key width without RoPE
    qk_rope_head_dim: int = 64  # d_h^R: decoupled RoPE width (shared key across heads)
    v_head_dim: int = 128  # per-head value width
    n_shared_experts: int = 1  # N_s: experts every token goes through
    n_routed_experts: int = 256  # N_r: experts chosen by the router
    num_experts_per_tok: int = 8  # K_r: routed experts per token
    n_group: int = 8  # expert groups: the report's nodes, one group per node
    topk_group: int = 4  # M: groups a token may route to (node-limited routing: <= M nodes)
    routed_scaling_factor: float = 2.5  # multiplies the normalised routed weights
    scoring_func: str = "sigmoid"  # affinity s = sigmoid(u.e) ('softmax' for V2-style)
    # How experts are picked (the release's three rules, see moe.Gate.select):
    # 'noaux_tc' (V3): correction bias b, group score = sum of the top-2 biased scores;
    # 'group_limited_greedy' (V2): no bias, group score = the group's maximum score;
    # 'greedy' (V2-Lite): no bias, no groups -- plain top-K_r.
    topk_method: str = "noaux_tc"
    # Renormalise the selected weights to sum to 1 before routed_scaling_factor. None means
    # what the released configs do: True for sigmoid (V3), False for softmax (V2).
    norm_topk_prob: bool | None = None
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    max_position_embeddings: int = 163840  # longest context the model is built for
    rope_theta: float = DEFAULT_ROPE_THETA  # RoPE base
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)  # YaRN or None
    num_nextn_predict_layers: int = 1  # D: multi-token-prediction depth
    tie_word_embeddings: bool = False  # V3 keeps embedding and output head separate
    initializer_range: float = 0.006  # init std (report sec. 4.2; config.json ships 0.02)
    # Training-loss coefficients (not part of the released config.json).
    mtp_loss_lambda: float = 0.3  # lambda of L_MTP (report eq. 25)
    aux_loss_alpha: float = 0.0001  # alpha of the sequence-wise balance loss (eq. 17)
    expert_aux_loss_alpha: float = 0.0  # classic batch-level balance loss ("aux-loss" baseline)

    # -- validation ---------------------------------------------------------------
    def __post_init__(self) -> None:
        self.rope_scaling = _rope_scaling(self.rope_scaling)
        if self.norm_topk_prob is None:
            self.norm_topk_prob = self.scoring_func == "sigmoid"
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group", "max_position_embeddings",
        ]
        for name in positive:
            _check_int(name, getattr(self, name), 1)
        non_negative = ["q_lora_rank", "n_shared_experts", "num_nextn_predict_layers",
                        "first_k_dense_replace"]
        for name in non_negative:
            _check_int(name, getattr(self, name), 0)
        for name in ("norm_topk_prob", "tie_word_embeddings"):
            _check_bool(name, getattr(self, name))
        if self.tie_word_embeddings:
            raise ValueError(
                "tie_word_embeddings=True: not supported; DeepSeek-V3 keeps the embedding and "
                "the output head untied (separate matrices), and so does minidsv3. Set it to false"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim={self.qk_rope_head_dim}: RoPE rotates pairs, so it must be even"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace}: at most "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func={self.scoring_func!r}: use 'sigmoid' or 'softmax'")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                f"n_routed_experts={self.n_routed_experts}"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by "
                f"n_group={self.n_group}"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method={self.topk_method!r}: use one of {TOPK_METHODS}")
        if self.topk_method == "greedy" and self.n_group != 1:
            raise ValueError(
                f"topk_method='greedy' routes without expert groups, but n_group={self.n_group}: "
                "set n_group=1 and topk_group=1, or use 'group_limited_greedy' / 'noaux_tc'"
            )
        if (self.topk_method == "noaux_tc" and self.n_group > 1
                and self.n_routed_experts // self.n_group < 2):
            raise ValueError(
                f"n_group={self.n_group}: each group needs >= 2 experts for the top-2-sum "
                f"group score (n_routed_experts={self.n_routed_experts})"
            )
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        if kept < self.num_experts_per_tok:
            raise ValueError(
                f"topk_group={self.topk_group}: group-limited routing keeps only {kept} experts, "
                f"fewer than num_experts_per_tok={self.num_experts_per_tok}"
            )
        _check_number("rms_norm_eps", self.rms_norm_eps, 0)
        _check_number("rope_theta", self.rope_theta, 1)  # theta_i = base^(-2i/d) needs base > 1
        _check_number("routed_scaling_factor", self.routed_scaling_factor, 0,
                      high=COEFFICIENT_MAX)
        # An init std past 1 gives untrained logits in the hundreds; near 100 the sigmoid
        # router's weights underflow to 0 and their normalisation to 0/0 = NaN.
        _check_number("initializer_range", self.initializer_range, 0, high=1)
        for name in ("mtp_loss_lambda", "aux_loss_alpha", "expert_aux_loss_alpha"):
            _check_number(name, getattr(self, name), 0, True, COEFFICIENT_MAX)
        self._check_module_counts()

    def _check_module_counts(self) -> None:
        """Refuse more blocks or routed experts than MAX_BLOCKS / MAX_ROUTED_EXPERTS."""
        L, D = self.num_hidden_layers, self.num_nextn_predict_layers
        if L + D > MAX_BLOCKS:
            name = "num_hidden_layers" if L >= D else "num_nextn_predict_layers"
            raise ValueError(
                f"{name}={getattr(self, name)}: at most MAX_BLOCKS={MAX_BLOCKS} blocks in all "
                f"(num_hidden_layers + num_nextn_predict_layers = {L + D}); each block is "
                "built module by module, so this many would take minutes"
            )
        moe_blocks = L + D - self.first_k_dense_replace
        experts = moe_blocks * self.n_routed_experts
        if experts > MAX_ROUTED_EXPERTS:
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts}: at most MAX_ROUTED_EXPERTS="
                f"{MAX_ROUTED_EXPERTS:,} routed experts over all MoE blocks, and "
                f"{moe_blocks} MoE blocks x {self.n_routed_experts} = {experts:,} (the release "
                "has 15,104); each expert is its own module, so this many would take minutes"
            )

    # -- derived sizes ------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: the no-RoPE part plus the decoupled RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_routing_bias(self) -> bool:
        """Only V3's 'noaux_tc' rule has the correction bias (``e_score_correction_bias``)."""
        return self.topk_method == "noaux_tc"

    @property
    def model_type(self) -> str:
        """The HF ``model_type`` of this config: V3's classes implement only 'noaux_tc'."""
        return "deepseek_v3" if self.has_routing_bias else "deepseek_v2"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Blocks from ``first_k_dense_replace`` on (MTP blocks included) use MoE."""
        return layer_idx >= self.first_k_dense_replace

    # -- presets and config.json ----------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """One of ``PRESETS`` with optional field overrides, validated."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of the release's ``config.json`` (HF layout, V3 or V2 by ``model_type``)."""
        d = self.to_dict()
        d["q_lora_rank"] = self.q_lora_rank or None  # the HF file writes null for "no LoRA"
        d.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            num_key_value_heads=self.num_attention_heads,  # MLA: every head has its own K/V
            hidden_act="silu",
            moe_layer_freq=1,
            attention_bias=False,
            **TOKEN_IDS[self.model_type],
            torch_dtype="bfloat16",
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a (possibly HF) dict; unknown keys such as ``torch_dtype`` are ignored.

        Reads ``deepseek_v3`` and ``deepseek_v2`` files in either RoPE layout. What a
        file leaves out means what it means to HF transformers: no ``rope_scaling``
        is plain RoPE, and a V2 file (which has no MTP field) has no MTP module.
        """
        if not isinstance(d, dict):  # dict([]) would silently give the 671B defaults
            raise ValueError(f"a model config must be a JSON object {{...}}; got {d!r:.60}")
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"config model_type={model_type!r}: minidsv3 reads "
                             f"{sorted(ARCHITECTURES)} (the DeepSeek-V2/V3 family)")
        d = {**FAMILY_DEFAULTS[model_type], **d}
        if d.get("q_lora_rank") is None:
            d["q_lora_rank"] = 0
        if d.get("rope_interleave", True) is not True:
            raise ValueError(
                f"rope_interleave={d['rope_interleave']!r}: minidsv3's RoPE rotates interleaved "
                "pairs, as the released weights expect; a file with rope_interleave=false holds "
                "weights permuted for rotate-half RoPE, which would be read wrongly")
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"moe_layer_freq={d['moe_layer_freq']!r}: minidsv3 builds every "
                             "block from first_k_dense_replace on as MoE (moe_layer_freq=1)")
        d["rope_theta"], d["rope_scaling"] = _read_rope(d)
        cfg = cls(**_known(cls, d))
        if cfg.model_type != model_type:
            raise ValueError(
                f"model_type={model_type!r} with topk_method={cfg.topk_method!r}: "
                f"{model_type} models route with "
                f"{'noaux_tc' if model_type == 'deepseek_v3' else 'greedy / group_limited_greedy'}")
        return cfg

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, YaRN block or None) from either layout of config.json.

    release / transformers < 5:  "rope_theta": 1e4, "rope_scaling": {"type": "yarn", ...} or null
    transformers >= 5:          "rope_parameters": {"rope_type": "default" | "yarn",
                                                    "rope_theta": 1e4, <YaRN fields>}
    A file may carry both only if they agree; a rope type other than plain RoPE
    ("default") and YaRN is refused rather than approximated.
    """
    theta = d.get("rope_theta", DEFAULT_ROPE_THETA)
    scaling = d.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling = _file_yarn_block(scaling, "rope_scaling")
    params = d.get("rope_parameters")
    if params is None:
        return theta, scaling
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters={params!r}: must be a JSON object")
    v5_theta = params.get("rope_theta", DEFAULT_ROPE_THETA)
    v5_scaling = _file_yarn_block({k: v for k, v in params.items() if k != "rope_theta"},
                                  "rope_parameters")
    for name, old, new, stated in [("rope_theta", theta, v5_theta, "rope_theta" in d),
                                   ("rope_scaling", scaling, v5_scaling, "rope_scaling" in d)]:
        if stated and old != new:
            raise ValueError(f"config states {name}={old!r} and rope_parameters says {new!r}: "
                             "the two layouts disagree; keep one of them")
    return v5_theta, v5_scaling


def _yarn_block(block: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The RopeScaling fields of a rope block, or None for plain RoPE ("default")."""
    block = dict(block)
    kinds = {block.pop(key) for key in ("rope_type", "type") if key in block}
    if len(kinds) > 1:
        raise ValueError(f"{where}: rope_type and type disagree ({sorted(kinds)})")
    kind = kinds.pop() if kinds else "default" if where == "rope_parameters" else "yarn"
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"{where}.rope_type={kind!r} is not implemented: minidsv3 implements "
                         "'default' (plain RoPE) and 'yarn' (DeepSeek's context extension)")
    return block


def _file_yarn_block(block: dict[str, Any], where: str) -> dict[str, Any] | None:
    """``_yarn_block`` with HF's reading of an absent ``mscale_all_dim``: 0, i.e. no
    softmax-scale correction and the whole temperature on the rotations (RopeScaling's
    own default, 1.0, is V3's stated value)."""
    block = _yarn_block(block, where)
    if block is not None:
        block.setdefault("mscale_all_dim", 0.0)
    return block


def _rope_scaling(value: Any) -> RopeScaling | None:
    """None, a RopeScaling, or the rope_scaling object of config.json (unknown keys refused)."""
    if value is None or isinstance(value, RopeScaling):
        return value
    allowed = ", ".join(sorted(ROPE_SCALING_KEYS))
    if not isinstance(value, dict):
        raise ValueError(f"rope_scaling={value!r}: must be null (plain RoPE) or an object of "
                         f"YaRN fields ({allowed})")
    unknown = sorted(map(str, set(value) - ROPE_SCALING_KEYS))
    if unknown:
        hint = (" (rope_theta is a top-level field of the config, not part of rope_scaling)"
                if "rope_theta" in unknown else "")
        raise ValueError(f"rope_scaling: unknown key(s) {unknown}; allowed: {allowed}{hint}")
    block = _yarn_block(value, "rope_scaling")  # "yarn", "default" (= None) or refused
    return None if block is None else RopeScaling(**_known(RopeScaling, block))


def _is_finite_number(value: Any) -> bool:
    """An int or a finite float; a bool or a numeric string is not a number here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large to be a float
        return False


def _check_number(name: str, value: Any, low: float, inclusive: bool = False,
                  high: float = math.inf) -> None:
    """Refuse all but a finite number above ``low`` (or equal to it if ``inclusive``), <= high."""
    if _is_finite_number(value) and (value >= low if inclusive else value > low) \
            and value <= high:
        return
    allowed = f"{'>=' if inclusive else '>'} {low:g}" + (
        f" and <= {high:g}" if high < math.inf else "")
    raise ValueError(f"{name}={value!r}: must be a finite number {allowed}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _check_bool(name: str, value: Any) -> None:
    """Only a real bool: the string "false" (or 0) would otherwise be read as true (or false)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be true or false (a boolean, not a string "
                         "or a number)")


def _known(kind: type, d: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keys that are fields of the dataclass ``kind``."""
    names = {f.name for f in dataclasses.fields(kind)}
    return {k: v for k, v in d.items() if k in names}


# What a file of each family means by leaving a field out, where that differs from our
# V3 defaults (HF transformers' defaults; an absent rope block is handled by _read_rope).
# V2 files have no num_nextn_predict_layers: V2 has no MTP module.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {},
    "deepseek_v2": dict(scoring_func="softmax", topk_method="greedy", num_nextn_predict_layers=0),
}

# What DeepSeek-V2 and V2-Lite share (their released config.json files): the tokenizer,
# one dense block, 2 shared + 6 of N routed experts, a softmax gate whose selected weights
# are not renormalised, YaRN with mscale = mscale_all_dim = 0.707, and no MTP module.
_V2_FAMILY = dict(
    vocab_size=102400, first_k_dense_replace=1, n_shared_experts=2, num_experts_per_tok=6,
    scoring_func="softmax", norm_topk_prob=False, num_nextn_predict_layers=0,
    rope_scaling=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                      beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
)

PRESETS: dict[str, dict[str, Any]] = {
    # The released DeepSeek-V3 (every default above is its value).
    "deepseek-v3": {},
    # DeepSeek-V2 (236B total, 21B activated; arXiv 2405.04434): 160 routed experts in 8
    # groups of which 3 are kept, ranked by their best expert; route scale 16.
    "deepseek-v2": dict(
        _V2_FAMILY, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160,
        n_group=8, topk_group=3, routed_scaling_factor=16.0, topk_method="group_limited_greedy",
    ),
    # DeepSeek-V2-Lite (15.7B total, 2.4B activated): full-rank queries, 64 routed experts
    # without groups (plain top-6).
    "deepseek-v2-lite": dict(
        _V2_FAMILY, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=0, n_routed_experts=64,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, topk_method="greedy",
    ),
    # Trains on Shakespeare characters on a laptop CPU (`make train`); same structure at
    # small width. As in the release, the dense FFN is as wide as one token's experts
    # (288 = 96 x (1 shared + 2 routed)). qk_nope + qk_rope = v_head_dim lets CPU attention
    # use its fused kernel. The init std is GPT-2's 0.02: the report's 0.006 is for d = 7168.
    "toy": dict(
        vocab_size=128, hidden_size=128, intermediate_size=288, moe_intermediate_size=96,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        max_position_embeddings=256, rope_scaling=None, initializer_range=0.02,
    ),
    # Smallest sensible model, for unit tests (milliseconds per forward).
    "tiny": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        max_position_embeddings=64, rope_scaling=None,
    ),
}
