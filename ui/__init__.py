"""Gradio apps: annotator page, side-by-side comparison app, leaderboard.

Not built yet: lands with issue 6 (see README, "Status").
"""
