"""Memory-adaptive batch size search (device-independent logic)."""
import pytest
import torch

from robustbench_med.batching import adaptive_batch_size, is_oom, largest_fitting


@pytest.mark.parametrize("capacity,start,limit", [(1, 8, 64), (37, 8, 4096), (64, 64, 64), (1000, 3, 512), (513, 64, 4096)])
def test_largest_fitting_finds_the_capacity(capacity, start, limit):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= capacity

    assert largest_fitting(fits, start, limit) == min(capacity, limit)
    assert len(calls) < 40


def test_nothing_fits_is_an_error():
    with pytest.raises(RuntimeError, match="batch of 1"):
        largest_fitting(lambda b: False, 8, 64)


def test_oom_detection_and_cpu_passthrough():
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not is_oom(RuntimeError("shape mismatch"))
    from conftest import make_toy

    assert adaptive_batch_size(make_toy(), torch.device("cpu"), 48) == 48
