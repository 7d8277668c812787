"""Checkpoint interop: explicit key maps between our models and other layouts (transformers, LAVIS, BERT)."""
