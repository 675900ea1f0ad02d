"""Saving and loading the final weights: atomic writes and checks that turn a bad file into a clear message."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
from torch import nn

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.model import NeuralNetwork


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` so that a crash at any moment leaves either its old contents or its new ones.

    `write` fills a temporary file in the same directory, which is flushed to disk and then renamed over `path`
    (a rename within one file system is atomic).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state_dict atomically, its tensors on the CPU so that any device can load it."""
    cpu_state = {key: tensor.detach().cpu() for key, tensor in state_dict.items()}
    atomic_write(path, lambda f: torch.save(cpu_state, f))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a saved state_dict with `weights_only=True` (a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; train first (`fmnist-dist train`) or fix the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UsageError(
            f"checkpoint {path} was refused: it is not plain weights ({first_line(error)}); "
            "load only state_dicts saved by torch.save(model.state_dict())"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise UsageError(
            f"checkpoint {path} is truncated or corrupted ({first_line(error)}); re-save it or train again"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(
            f"checkpoint {path} holds a {type(state).__name__}, not a state_dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    return state


def load_model(path: Path, device: torch.device | str = "cpu") -> NeuralNetwork:
    """A fresh NeuralNetwork on `device` with the weights saved at `path`."""
    state = load_state_dict(path)
    model = NeuralNetwork()
    check_architecture(model, state, path)
    model.load_state_dict(state)
    return model.to(device)


def check_architecture(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights of another architecture, naming missing and unexpected keys and mismatched shapes."""
    expected = model.state_dict()
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"missing keys {missing}")
    if unexpected := sorted(state.keys() - expected.keys()):
        problems.append(f"unexpected keys {unexpected}")
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise UsageError(
            f"checkpoint {path} is not a fmnist-dist NeuralNetwork: {'; '.join(problems)}; "
            "pass a model.pth saved by fmnist-dist or the PyTorch quickstart"
        )
