"""Benchmark scripts that print figures (never timed tests): ``python -m minidsv3.bench``.

* ``train``  -- training throughput of the toy MoE vs its dense twin, FLOP/s vs peak;
* ``decode`` -- generation speed, cache sizes and MTP speculative decoding.
"""
