"""The CUDA path gives the same answers as the CPU path. Skipped without a GPU."""
import pytest
import torch
from conftest import tiny_split

from phpn.images.folders import scan_image_folder
from phpn.method.nmf import NMFConfig, nmf
from phpn.method.refine import RefineConfig, refine
from phpn.pipeline.discover import DiscoveryConfig, discover

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_nmf_and_refinement_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(6, 500, 128, generator=g))
    heads = torch.randn(6, 128, generator=g)
    cpu = nmf(features, NMFConfig(k=3))
    gpu = nmf(features.cuda(), NMFConfig(k=3))
    torch.testing.assert_close(gpu.relative_error.cpu(), cpu.relative_error, rtol=1e-2, atol=1e-4)
    refined = refine(features.cuda(), gpu.prototypes, heads.cuda(), RefineConfig())
    assert refined.prototypes.is_cuda
    err = (refined.prototypes.sum(1).cpu() - heads.double()).norm(dim=1) / heads.double().norm(dim=1)
    assert float(err.max()) < 1e-6
    assert bool((refined.objective_after <= refined.objective_before).all())


def test_discovery_on_cuda_is_exact(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, num_classes=4)
    run = discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                   DiscoveryConfig(k=3, device="cuda"))
    assert run.meta["device"].startswith("cuda")
    assert float(run.head_error().max()) < 1e-12
