"""Encode an image-caption dataset once into WebDataset shards of Kandinsky 2.2 embeddings and latents."""
