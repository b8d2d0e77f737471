"""Benchmarks: speed and memory of rto_jax against PyTorch peers and this machine's matmul ceiling.

`python -m benchmarks.run [--smoke] [--only ROWS] [--out DIR]`; see benchmarks/run.py.
"""
