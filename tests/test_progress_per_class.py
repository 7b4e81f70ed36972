"""Discovery's NMF and refinement bars move class by class inside a group of classes decomposed
together, and the refinement reports each class as its solver stops."""
from __future__ import annotations

import torch
from conftest import tiny_split

from phpn.images.folders import scan_image_folder
from phpn.method.refine import RefineConfig, refine
from phpn.pipeline.discover import DiscoveryConfig, discover


def test_refinement_reports_each_class_as_it_is_solved():
    torch.manual_seed(0)
    b, n, d, k = 6, 40, 24, 3
    features = torch.rand(b, n, d)
    protos = torch.rand(b, k, d)
    heads = torch.randn(b, d)
    told = []
    refined = refine(features, protos, heads, RefineConfig(max_iter=200, subspace_rank=8), solved=told.append)
    assert told == sorted(told) and told[-1] == b and told[0] >= 1
    # Classes stop at their own iteration: the count grows as they do.
    assert len(set(refined.iterations.tolist())) > 1 and len(set(told)) > 1
    again = refine(features, protos, heads, RefineConfig(max_iter=200, subspace_rank=8))
    assert torch.equal(again.prototypes, refined.prototypes)  # reporting changes nothing


def test_discovery_bars_move_within_one_group(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    seen = []
    discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
             DiscoveryConfig(k=3, device="cpu", lbfgs_iter=200), progress=lambda *a: seen.append(a))
    refine_done = [done for stage, done, total in seen if stage == "refine"]
    assert refine_done[-1] == 4 and refine_done == sorted(refine_done)
    assert set(refine_done) - {0, 4}, refine_done  # some class reported before the whole group was done
    nmf_done = [done for stage, done, total in seen if stage == "nmf"]
    assert nmf_done == sorted(nmf_done) and nmf_done[-1] == 4
