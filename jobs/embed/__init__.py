"""Embed stage: CLIP image/text embeddings and similarity scores per shard (DataComp layout)."""
