"""pick_device: the one device rule of evaluation and inference."""
from __future__ import annotations

import pytest
import torch

from src.devices import pick_device


class Refused(ValueError):
    pass


def test_cpu_and_the_default():
    assert pick_device("cpu", Refused) == torch.device("cpu")
    assert pick_device(torch.device("cpu"), Refused) == torch.device("cpu")
    assert pick_device(None, Refused).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["gpu", "mps", "", "cuda:x"])
def test_other_names_raise_the_callers_error(name):
    with pytest.raises(Refused, match="device must be 'cpu' or 'cuda'"):
        pick_device(name, Refused)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused(name):
    with pytest.raises(Refused, match=f"--device {name} requested but no CUDA GPU is available"):
        pick_device(name, Refused)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_index_beyond_the_machines_is_refused():
    assert pick_device("cuda:0", Refused) == torch.device("cuda:0")
    with pytest.raises(Refused, match="CUDA GPU"):
        pick_device(f"cuda:{torch.cuda.device_count()}", Refused)
