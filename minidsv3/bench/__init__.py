"""Benchmark scripts that print figures (never timed tests): ``python -m minidsv3.bench``.

* ``train``  -- training throughput of the toy MoE vs its dense twin, FLOP/s vs peak;
* ``decode`` -- generation speed, cache sizes and MTP speculative decoding;
* ``wallclock`` -- validation loss of MoE + MTP, MoE and the dense twin, each trained
  for the same seconds (``train --time-budget``).
* ``hf``     -- a training step vs HF transformers' ``DeepseekV3ForCausalLM`` on the same
  config and weights (skipped, exit 0, when transformers is not installed).
"""

import argparse


def int_at_least(low: int):
    """An argparse ``type``: an integer >= ``low``, else a usage error naming the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return value

    return parse
