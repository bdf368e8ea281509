"""Gradio apps: the annotator page (``annotator.py``, with safe rendering of model output in ``render.py``);
the side-by-side comparison app and leaderboard come later (see README, "Status").
"""
