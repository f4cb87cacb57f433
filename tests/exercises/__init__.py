"""Checkers for the exercises of the docs (docs/exercises/): each compares a student's function with
the reference implementation in the model files. See _harness.py for how they find the student's
code and when an unattempted exercise is skipped rather than failed."""
