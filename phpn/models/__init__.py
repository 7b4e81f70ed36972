"""Loading classifiers and cutting them into backbone + head."""
from .head import HeadSplit, LoadedModel, PostPoolNorm

__all__ = ["HeadSplit", "LoadedModel", "PostPoolNorm"]
