"""Alignment trainers: SFT, the DPO family, PPO, GRPO / RLOO, and alignment evaluation.

Not built yet: the trainers land with issue 5 (see README, "Status").
"""
