"""The preference store, comparison tasks, assignment, agreement statistics, export / import.

- ``records.py``: the one preference record shared with rewards/ and align/.
- ``schema.py`` + ``migrations/``: the SQL schema (SQLAlchemy models, Alembic migrations).
- ``store.py``: ``Store``: accounts, items, assignments, idempotent votes, undo, progress (SQLite / PostgreSQL).
- ``assign.py``: who gets which item (overlap, never twice, gold items, priority).
- ``tasks.py``: prompts -> K sampled answers per prompt -> comparison items; pre-generated answers.
- ``agreement.py``: Cohen's and Fleiss' kappa, Krippendorff's alpha, gold accuracy, the report.
- ``export.py``: votes -> TRL prompt / chosen / rejected (JSONL, Parquet, datasets); public sets -> store.
- ``server.py``: the JSON vote API + the annotator page (``ui/annotator.py``); ``cli.py``: ``glmwb annotate``
  and ``glmwb annotation ...``; ``loadtest.py``: a load generator for the vote API.
"""
