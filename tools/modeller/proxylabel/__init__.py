"""Modeller tools of the proxy labeller: shard generator, index builder, MLP trainer, demo set."""
