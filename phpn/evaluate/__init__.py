"""Evaluating prototypes: interpretability (consistency, stability) and faithfulness.

- :func:`evaluate_run`: a saved run on a model, with an image folder and/or a CUB-layout
  part-annotated dataset; returns a JSON-ready dict (the CLI ``evaluate`` and the app call it).
- :func:`run_parts_benchmark`: the synthetic parts benchmark (ground-truth parts).
- :mod:`.consistency`: consistency and stability as Huang et al. define them (ICCV 2023) on plain arrays.
- :mod:`.parts`: the CUB-200-2011 annotation loader.
"""
from phpn.evaluate.benchmark import SIZES, run_parts_benchmark
from phpn.evaluate.consistency import (
                      consistency_score,
                      consistent,
                      part_fractions,
                      part_sets,
                      peak_locations,
                      perturb,
                      scaled_half_size,
                      stability_score,
                      stable_fraction,
)
from phpn.evaluate.evaluation import DEFAULTS, evaluate_run, summary_text
from phpn.evaluate.parts import PartDataset, is_cub_layout, load_cub_parts

__all__ = [
    "DEFAULTS", "SIZES", "PartDataset", "consistency_score", "consistent", "evaluate_run", "is_cub_layout",
    "load_cub_parts", "part_fractions", "part_sets", "peak_locations", "perturb", "run_parts_benchmark",
    "scaled_half_size", "stability_score", "stable_fraction", "summary_text",
]
