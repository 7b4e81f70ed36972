"""Loading classifiers and cutting them into backbone + head.

    load_model(checkpoint, arch=..., model_def=..., trust_pickle=..., num_classes=...) -> LoadedModel
    split_head(model) -> HeadSplit          diagnose(loaded_or_model) -> Diagnosis
"""
from .checkpoint import read_checkpoint, read_state_dict
from .doctor import Diagnosis, diagnose
from .head import HeadSplit, LoadedModel, PostPoolNorm
from .lite0 import load_efficientnet_lite0
from .loader import load_model
from .split import split_head
from .zoo import infer_arch

__all__ = [
    "Diagnosis", "HeadSplit", "LoadedModel", "PostPoolNorm", "diagnose", "infer_arch", "load_efficientnet_lite0",
    "load_model", "read_checkpoint", "read_state_dict", "split_head",
]
