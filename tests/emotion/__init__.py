"""The emotion service: limits, ensembles, model swaps."""
