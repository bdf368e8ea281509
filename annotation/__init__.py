"""The preference store, comparison tasks, assignment, agreement statistics, export / import.

Not built yet: lands with issue 6 (see README, "Status").
"""
