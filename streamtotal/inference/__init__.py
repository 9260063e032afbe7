"""Inference over streamed stores: latent embeddings (and, later, the totalVI guide's downstream analyses)."""
