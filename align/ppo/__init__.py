"""Our own PPO for GLM policies (TRL 1.16 ships none).

core.py      masked statistics, KL estimators, per-token rewards, GAE, clipped losses, KL controllers
models.py    actor (+ value head on a shared backbone), separate critic, frozen / adapter-off reference
rollout.py   prompts, KV-cached sampling with log-probs, GLM terminators, rewards (rules / RM / HTTP)
trainer.py   the PPO loop and its per-step diagnostics (single device or DeepSpeed ZeRO 1-3 through
             pretrain/strategy.py, generation under ZeRO-3 with gathered parameters)
samples.py, plots.py  the sample table with per-token KL, training curves
run.py       PPORecipe (stage "ppo") and run_ppo
"""
