"""clipfnd: CLIP-style contrastive pretraining that finds and removes false negatives."""

__version__ = "0.1.0"
