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


class _Budget:
    """An attacked model whose device holds ``cap`` samples in one graph: more raise CUDA's out-of-memory error."""

    def __init__(self, cap: int):
        self.cap, self.current, self.held = cap, None, 0

    def objective(self, x, y):
        if x is not self.current:  # a new input: the previous graph was freed by its backward
            self.current, self.held = x, 0
        self.held += len(x)
        if self.held > self.cap:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x.flatten(1).sum(1) * y.float()


@pytest.mark.parametrize("eot,expected", [(1, 64), (4, 16), (3, 21)])
def test_the_probe_holds_eot_passes_in_one_graph(eot, expected):
    """Issue #21 item 7: an EOT attack step keeps ``eot`` forward passes alive until its backward, so the batch that
    fits shrinks by that factor; the probe measures exactly that (on copies of a real sample and its target)."""
    from robustbench_med.batching import probe_objective

    fits = probe_objective(_Budget(64), torch.rand(3, 1, 4, 4), torch.tensor([1, 0, 1]), eot=eot)
    assert largest_fitting(fits, 8, 4096) == expected


def test_the_runner_probes_the_defended_view_with_its_eot(tmp_path, monkeypatch):
    """The memory cap is probed per victim × defence on the model the attack sees (the purified victim, with the
    defence's EOT) on a real sample, not on the bare victim with random inputs; the manifest records the cap."""
    import json

    from rank_helpers import linear_victim, table, tiny_grid

    from robustbench_med import runner
    from robustbench_med.grid import parse_grid

    seen = []

    def record(view, device, requested, limit=4096, *, sample=None, eot=1, tag=""):
        seen.append((type(view).__name__, eot, tag.split("{")[0], tuple(sample[0].shape)))
        return 3  # a small cap: calls of sample-independent attacks are split, results unchanged

    monkeypatch.setattr(runner, "adaptive_batch_size", record)
    with linear_victim():
        grid = tiny_grid(name="probe", defenses=["identity.none", {"name": "gaussian.eot", "params": {"sigma": 0.05}, "eot": 2}])
        db = runner.run_grid(parse_grid(grid), tmp_path, progress=False)
    assert set(seen) == {("PurifiedVictim", 1, "identity.none", (1, 1, 64, 64)), ("PurifiedVictim", 2, "gaussian.eot", (1, 1, 64, 64))}
    (manifest,), = table(db, "SELECT manifest FROM runs")
    assert json.loads(manifest)["memory"]["linear.phantom"]["memory_batch"] == 3
