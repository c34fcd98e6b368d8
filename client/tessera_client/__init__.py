"""Python client of the tessera gateway."""

from tessera_client.client import ClientTls, Face, ItemError, TesseraClient, to_image, video_frames

__all__ = ["ClientTls", "Face", "ItemError", "TesseraClient", "to_image", "video_frames"]
