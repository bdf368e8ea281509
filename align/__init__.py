"""Alignment trainers: SFT (TRL), the DPO family (TRL + our packed path, online rounds), our own PPO
(``align.ppo``), GRPO / RLOO (TRL with our reward functions), and alignment evaluation (``align.evaluate``).
See docs/align.md."""
