"""The engagement service and its models."""
