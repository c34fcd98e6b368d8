"""The model services and the shared parts they stand on (runtime, vision, fusion)."""
