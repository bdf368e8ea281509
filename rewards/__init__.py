"""Reward models (Bradley–Terry on a GLM backbone), rule rewards and the scoring API.

Not built yet: lands with issue 4 (see README, "Status").
"""
