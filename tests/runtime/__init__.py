"""services/runtime: admission, batching, backends, the repository, streams, security, the wire."""
