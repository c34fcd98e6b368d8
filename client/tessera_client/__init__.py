"""Python client of the tessera gateway."""

from tessera_client.client import Face, ItemError, TesseraClient, to_image

__all__ = ["Face", "ItemError", "TesseraClient", "to_image"]
