"""Benchmark evaluation of any causal-LM folder, or of answers made elsewhere (``glmwb eval``).

sandbox.py   runs untrusted code (HumanEval) in a limited, network-less subprocess
lmeval.py    scoring through EleutherAI's lm-eval, offline, on answers already in hand
tasks.py     the tasks: GSM8K, IFEval, multiple choice, HumanEval, the world, needle, RM win rate
harness.py   batched generation with per-item caching, provenance, paired comparison, tables and plots
"""
