"""Python client of the tessera gateway."""

from client.client import Face, ItemError, TesseraClient, to_image

__all__ = ["Face", "ItemError", "TesseraClient", "to_image"]
