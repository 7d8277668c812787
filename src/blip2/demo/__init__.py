"""The built-in demo (`blip2 demo`): a small BLIP-2 trained from nothing on CPU, scored on held-out images.

`world` renders the data and parses captions, `pretrain` trains the two frozen towers on one modality
each, `run` runs every phase through the library's training engine and pipeline, `report` writes the
table and the figure.
"""
