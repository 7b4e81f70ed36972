"""Loading classifiers and cutting them into backbone + head.

    load_model(checkpoint, arch=..., model_def=..., trust_pickle=..., num_classes=...) -> LoadedModel
    split_head(model) -> HeadSplit          diagnose(loaded_or_model) -> Diagnosis
"""
from phpn.head import HeadSplit, LoadedModel, PostPoolNorm
from phpn.models.checkpoint import read_checkpoint, read_state_dict
from phpn.models.doctor import Diagnosis, diagnose
from phpn.models.lite0 import load_efficientnet_lite0
from phpn.models.loader import load_model
from phpn.models.split import split_head
from phpn.models.zoo import infer_arch

__all__ = [
    "Diagnosis", "HeadSplit", "LoadedModel", "PostPoolNorm", "diagnose", "infer_arch", "load_efficientnet_lite0",
    "load_model", "read_checkpoint", "read_state_dict", "split_head",
]
