"""services/vision: safe decoding, face detection (BlazeFace, Haar), preprocessing."""
