"""The proxylabel service: kNN, embedder, features, shard jobs."""
