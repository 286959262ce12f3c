"""The Ray executor (issue #21 item 4) on a local Ray instance: one task per shard, the stores streamed back to the
driver and merged; the result equals a single-process run row for row, and a finished run resumes without work."""
import json

import pytest
from rank_helpers import store_contents as _rows
from rank_helpers import table

from robustbench_med.errors import ConfigError
from robustbench_med.grid import parse_grid
from robustbench_med.runner import run_grid

ray = pytest.importorskip("ray", reason="the Ray executor test needs ray (installed by make test)")

from robustbench_med.executors import run_ray  # noqa: E402

GRID = {"name": "on_ray", "n_examples": 12, "unit_size": 4, "victims": ["cnn.phantom"],
        "attacks": [{"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 2}},
                    {"name": "noise.uniform", "params": {"eps": "8/255"}}],
        "defenses": ["identity.none", {"name": "jpeg.bpda", "params": {"quality": 60}}]}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_ray_run_equals_a_single_process_run(local_ray, tmp_path):
    single = run_grid(parse_grid(GRID), tmp_path / "single", progress=False)
    merged = run_ray(parse_grid(GRID), tmp_path / "ray", tasks=3, progress=False)
    assert merged == tmp_path / "ray" / "results.sqlite"
    assert sorted(p.parent.name for p in (tmp_path / "ray").glob("shard-*/results.sqlite")) == [f"shard-{k}-of-3" for k in (1, 2, 3)]
    assert _rows(merged) == _rows(single)
    for db in (tmp_path / "ray").glob("shard-*/results.sqlite"):  # the driver fitted and computed the clean passes once
        for (manifest,) in table(db, "SELECT manifest FROM runs"):
            assert json.loads(manifest)["work"] == {"defenses_prepared": [], "clean_passes": []}
    again = run_ray(parse_grid(GRID), tmp_path / "ray", tasks=3, progress=False)  # resumed: nothing new, same rows
    assert _rows(again) == _rows(single)


def test_ray_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--tasks"):
        run_ray(parse_grid(GRID), tmp_path, tasks=0)
    with pytest.raises(ConfigError, match="--gpus-per-task"):
        run_ray(parse_grid(GRID), tmp_path, gpus_per_task=-1)
