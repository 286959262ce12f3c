"""A model repository's workflow from the command line alone: its own package (unknown to the project), a plain
state-dict safetensors file, timm / MONAI / Hugging Face models, run → publish → verify → check, and the README's snippets
and GitHub Actions commands executed as written (so they cannot rot)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_own_model import USER_MODULE, tiny_vit_folder

README = Path(__file__).resolve().parents[1] / "README.md"



def readme_blocks(lang: str) -> list[str]:
    """The fenced code blocks of one language in the README's 'Evaluate your own model' section."""
    text = README.read_text()
    section = text.split("## Evaluate your own model", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _save_net(path: Path, predicts: int) -> None:
    """Plain state dict of TinyNet(width=8) predicting class ``predicts`` whatever the image (robust by construction:
    its accuracy is the class's share; class 0, 'none', is the commonest lesion type, class 2, 'tumour', a rare one)."""
    from safetensors.torch import save_file

    bias = torch.zeros(3)
    bias[predicts] = 4.0
    state = {"conv.weight": torch.zeros(8, 1, 3, 3), "conv.bias": torch.zeros(8), "bn.weight": torch.ones(8),
             "bn.bias": torch.zeros(8), "bn.running_mean": torch.zeros(8), "bn.running_var": torch.ones(8),
             "bn.num_batches_tracked": torch.tensor(0), "head.weight": torch.zeros(3, 8), "head.bias": bias}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A model repository: package `mymodels`, weights, a Hugging Face folder and the README's grid (made small)."""
    root = tmp_path_factory.mktemp("model_repo")
    (root / "mymodels").mkdir()
    (root / "mymodels" / "__init__.py").write_text("")
    (root / "mymodels" / "nets.py").write_text(USER_MODULE)  # TinyNet: conv, BatchNorm, pooling, linear head
    _save_net(root / "weights" / "tinynet.safetensors", predicts=0)
    _save_net(root / "weights" / "candidate.safetensors", predicts=0)
    _save_net(root / "weights" / "worse.safetensors", predicts=2)
    tiny_vit_folder(root / "vit")
    grid = yaml.safe_load(next(b for b in readme_blocks("yaml") if b.startswith("name: mymodels")))
    grid.update(n_examples=32, batch_size=32, attacks=[{"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 3}}])
    grid["victims"] += [
        {"name": "mylab.unet", "factory": "monai:UNet", "wrap": {"task": "segmentation", "input_size": [1, 64, 64]},
         "params": {"spatial_dims": 2, "in_channels": 1, "out_channels": 6, "channels": [4, 8], "strides": [2], "num_res_units": 0}},
        {"name": "mylab.vit", "factory": f"hf:{root / 'vit'}", "weights": str(root / "vit"), "wrap": {"task": "binary"}},
    ]
    (root / "mymodels.yaml").write_text(yaml.safe_dump(grid))
    small = {**grid, "name": "tinynet", "n_examples": 160, "batch_size": 160, "victims": grid["victims"][:1],
             "attacks": [{"name": "pgd.linf", "params": {"eps": "8/255", "steps": 2}}]}
    (root / "tinynet.yaml").write_text(yaml.safe_dump(small))
    return root


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-m", "robustbench_med", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)


def test_run_publish_check_from_the_command_line_alone(repo):
    without = cli(repo, "run", "mymodels.yaml", "--out", "runs/refused", "--quiet")
    assert without.returncode == 2 and "--import mymodels" in without.stderr, without.stderr
    commands = [line for block in readme_blocks("bash") for line in block.splitlines() if line.startswith("robustbench-med ")]
    assert [c.split()[1] for c in commands] == ["run", "publish", "check"]
    for command in commands[:2]:  # run, then publish (which resumes the run's store)
        done = cli(repo, *command.split()[1:], "--quiet")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from robustbench_med.entries import load_entries

    entries = load_entries(repo / "leaderboards")
    assert {e["victim"] for e in entries} == {"mylab.tinynet", "mylab.resnet18", "mylab.unet", "mylab.vit"}
    sha = {e["victim"]: e["weights_sha256"] for e in entries}
    import hashlib

    assert sha["mylab.tinynet"] == hashlib.sha256((repo / "weights" / "tinynet.safetensors").read_bytes()).hexdigest()
    assert sha["mylab.vit"] == hashlib.sha256((repo / "vit" / "model.safetensors").read_bytes()).hexdigest()
    assert all(len(s) == 64 for s in sha.values()), "random-init factories are named by their state-dict sha256"
    same = cli(repo, *commands[2].split()[1:], "--quiet")  # the README's check: candidate weights equal to the baseline's
    assert same.returncode == 0 and "=> OK" in same.stdout, same.stdout[-3000:] + same.stderr[-3000:]
    assert (repo / "robustness.xml").read_text().startswith("<?xml") and "<failure" not in (repo / "robustness.xml").read_text()
    entry = repo / "leaderboards" / "phantom.ct" / "Linf-8_255" / "mylab.tinynet.json"
    verified = cli(repo, "verify", str(entry), "--import", "mymodels", "--samples", "6", "--quiet")
    assert verified.returncode == 0 and "=> VERIFIED" in verified.stdout, verified.stdout[-3000:] + verified.stderr[-3000:]
    whole = cli(repo, "check", "--baseline", "leaderboards", "--import", "mymodels", "--quiet")  # every victim, own weights
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    for victim in ("mylab.resnet18", "mylab.unet", "mylab.vit"):
        assert victim in whole.stdout


def test_check_fails_a_worse_candidate_from_the_command_line(repo):
    """n = 160: a candidate 20+ points less accurate (robust and clean) is a significant, material regression."""
    done = cli(repo, "publish", "tinynet.yaml", "--import", "mymodels", "--out", "board160", "--quiet")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bad = cli(repo, "check", "--baseline", "board160", "--import", "mymodels", "--weights", "weights/worse.safetensors",
              "--junit", "bad.xml", "--quiet")
    assert bad.returncode == 1 and "REGRESSION" in bad.stdout, bad.stdout[-3000:] + bad.stderr[-3000:]
    regressed = [line for line in bad.stdout.splitlines() if line.endswith("REGRESSION")]
    assert any("robust accuracy" in line for line in regressed) and "warning" not in bad.stdout
    assert "<failure" in (repo / "bad.xml").read_text()


def test_the_readme_github_actions_commands_run_locally(repo):
    """The workflow's `robustbench-med` steps, as written, against the baseline the previous test published."""
    if not (repo / "leaderboards").is_dir():
        pytest.skip("needs the published baseline of the previous test")
    workflow = yaml.safe_load(next(b for b in readme_blocks("yaml") if b.startswith("name: robustness")))
    steps = [s["run"] for s in workflow["jobs"]["robustness"]["steps"] if str(s.get("run", "")).startswith("robustbench-med ")]
    assert steps, "the workflow runs robustbench-med"
    for step in steps:
        done = cli(repo, *step.split()[1:], "--quiet")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("index", range(5))
def test_readme_python_snippets_run_as_written(index):
    blocks = readme_blocks("python")
    assert len(blocks) == 5, "plain PyTorch, timm, MONAI, Hugging Face and MONAI 3D"
    scope: dict = {}
    exec(compile(blocks[index], f"README snippet {index + 1}", "exec"), scope)
    df = scope["df"]
    assert len(df) and (df.status == "done").all() and (df.robust <= df.clean + 1e-9).all()
