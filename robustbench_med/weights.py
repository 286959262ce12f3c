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


def read_state_dict(path: str | os.PathLike[str], expected_sha256: str | None = None, hint: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict safely; verify its sha256 against ``expected_sha256`` or the sidecar."""
    path = Path(path)
    fix = f" {hint}" if hint else ""
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist.{fix}")
    digest = sha256_file(path)
    expected = expected_sha256 or read_sidecar(path).get("sha256")
    if expected and digest != expected:
        raise WeightsError(f"weights file {path} is corrupted: sha256 {digest[:12]}… != recorded {expected[:12]}….{fix}")
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
    return state, digest


def load_weights(module: nn.Module, path: str | os.PathLike[str], expected_sha256: str | None = None, hint: str = "") -> str:
    """Load verified weights into ``module`` (strict); return the file's sha256."""
    state, digest = read_state_dict(path, expected_sha256, hint)
    missing, unexpected = _key_diff(module, state)
    if missing or unexpected:
        raise WeightsError(
            f"weights file {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}. {hint}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights file {path} does not match the model: {e}. {hint}") from None
    return digest


def _key_diff(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = set(module.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)
