"""Recipes: the schema of every stage's config, the strict YAML loader, and the ``glmwb`` CLI."""
