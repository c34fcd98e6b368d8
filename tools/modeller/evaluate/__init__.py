"""Modeller tools that evaluate a served model on labelled data (docs/architecture.md, modellers)."""
