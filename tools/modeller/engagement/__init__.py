"""Modeller tools of the engagement service: synthetic clip generator and the demo models."""
