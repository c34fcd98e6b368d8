"""services/fusion and the config loader: the rules file and the fusion functions."""
