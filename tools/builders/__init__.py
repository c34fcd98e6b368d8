"""Builders that turn pretrained weights from other formats into the model repository."""
