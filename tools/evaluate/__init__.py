"""Modeller tools that evaluate a served model on labelled data (DESIGN.md §1, user 5)."""
