"""Safe checkpoint I/O: safetensors (or ``torch.load(weights_only=True)``), sha256-verified, atomically written.

Nothing is ever unpickled: a ``.pt``/``.pth``/``.bin`` file is read with ``weights_only=True`` and any other format is
refused. A file whose sha256 differs from the one recorded beside it (or expected by the caller) is reported as
corrupted with the command that rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_med.errors import WeightsError


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar(path: str | os.PathLike[str]) -> Path:
    return Path(str(path) + ".json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_weights(module: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> str:
    """Write ``module``'s state dict as safetensors plus a JSON sidecar with its sha256; return the sha256."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    blob = save(state)
    path = Path(path)
    atomic_write_bytes(path, blob)
    digest = hashlib.sha256(blob).hexdigest()
    info = {"sha256": digest, **(meta or {})}
    atomic_write_bytes(sidecar(path), json.dumps(info, indent=2, sort_keys=True, default=str).encode())
    return digest


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    side = sidecar(path)
    if not side.exists():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"weights sidecar {side} is not valid JSON ({e})") from None


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: the file itself, or those of a Hugging Face ``save_pretrained`` folder
    (``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors`` listed by its index, or ``pytorch_model.bin``)."""
    if not path.is_dir():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index ({e})") from None
        return [path / s for s in shards]
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise WeightsError(f"{path} is a folder without {' or '.join(HF_WEIGHT_FILES)} (save it with save_pretrained)")


def read_state_dict(path: str | os.PathLike[str], expected_sha256: str | None = None, hint: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict safely; verify its sha256 against ``expected_sha256`` or the sidecar.

    ``path`` may also be a Hugging Face folder: its weight files are read and the returned digest is the sha256 of
    the single file, or of the concatenated shard digests (in file-name order) for a sharded checkpoint.
    """
    path = Path(path)
    fix = f" {hint}" if hint else ""
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist.{fix}")
    files = weight_files(path)
    digests = [sha256_file(f) for f in files]
    digest = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    expected = expected_sha256 or (read_sidecar(path).get("sha256") if not path.is_dir() else None)
    if expected and digest != expected:
        raise WeightsError(f"weights file {path} is corrupted: sha256 {digest[:12]}… != recorded {expected[:12]}….{fix}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_file(f, fix))
    return state, digest


def _read_file(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """One weight file: safetensors, or a torch file read with ``weights_only=True`` (nothing is unpickled)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
        else:
            raise WeightsError(f"refusing to load {path}: only .safetensors or weights-only torch files are read")
    except WeightsError:
        raise
    except Exception as e:  # safetensors / unpickler errors on damaged or unsafe files
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}.{fix}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a flat tensor state dict.{fix}")
    return state


def load_weights(module: nn.Module, path: str | os.PathLike[str], expected_sha256: str | None = None, hint: str = "") -> str:
    """Load verified weights into ``module`` (strict); return the file's sha256.

    The state dict may be ``module``'s own, or — for a victim wrapping a network as ``module.net`` — the network's
    plain state dict (``torch.save(net.state_dict())``, ``save_file(net.state_dict())``, ``save_pretrained``); a
    ``module.`` prefix left by ``DataParallel`` / ``DistributedDataParallel`` is removed.
    """
    state, digest = read_state_dict(path, expected_sha256, hint)
    target, state = _match_target(module, state)
    if Path(path).is_dir():
        state = _hf_state(module, Path(path), state)
        target = getattr(module, "net", module) if isinstance(getattr(module, "net", None), nn.Module) else module
    missing, unexpected = _key_diff(target, state)
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}. {hint}"
        )
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights file {path} does not match the model: {e}. {hint}") from None
    return digest


def _hf_state(module: nn.Module, folder: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a ``save_pretrained`` folder as the wrapped Hugging Face model names it in memory:
    ``transformers`` may store other key names on disk than its modules use, so the folder is read back through
    the model class's own ``from_pretrained`` (local files only, no remote code)."""
    net = getattr(module, "net", module)
    load = getattr(type(net), "from_pretrained", None)
    if load is None:
        return state
    try:
        return load(str(folder), local_files_only=True, trust_remote_code=False).state_dict()
    except Exception as e:  # a folder of another architecture, a damaged config
        raise WeightsError(f"cannot load {folder} with {type(net).__name__}.from_pretrained: {type(e).__name__}: {e}") from None


def _match_target(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The module the keys of ``state`` belong to: ``module`` itself or its wrapped ``net`` (prefix-free keys)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    net = getattr(module, "net", None)
    if isinstance(net, nn.Module) and not any(k.startswith("net.") for k in state):
        own = set(module.state_dict())
        if not set(state) <= own:
            return net, state
    return module, state


def _key_diff(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = set(module.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)


def weights_path(name: str) -> Path:
    """Where the project-trained weights of registered victim ``name`` are cached."""
    from robustbench_med import paths

    return paths.weights_dir() / f"{name}.safetensors"
