"""Saving and loading the final weights, with checks that turn a bad file into a clear message."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.storage.atomic_files import atomic_write, file_problem
from fmnist_dist.storage.run_dir import STATE_WEIGHTS_FILE

SAFETENSORS_SUFFIX = ".safetensors"
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"  # the PROTO opcode that starts every pickle of protocol 2 or later


def save_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state_dict atomically, its tensors on the CPU so that any device can load it."""
    cpu_state = {key: tensor.detach().cpu() for key, tensor in state_dict.items()}
    atomic_write(path, lambda f: torch.save(cpu_state, f))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read saved weights: a `.safetensors` file, or a torch.save file read with `weights_only=True` (a pickle
    that would run code is refused).

    Raises:
        UsageError: the path is no readable file, not a state_dict, or holds weights no model can use.
    """
    path = Path(path)
    _check_checkpoint_file(path)
    state = _read_safetensors(path) if path.suffix == SAFETENSORS_SUFFIX else _read_torch_save(path)
    for key, tensor in state.items():
        if found := _weight_problem(tensor):
            problem, advice = found
            raise UsageError(f"checkpoint {path} holds unusable weights: {key} {problem}; {advice}")
    return state


def _check_checkpoint_file(path: Path) -> None:
    problem = file_problem(path)
    if problem is None:
        return
    if problem == "does not exist":
        advice = "train first (`fmnist-dist train`) or fix the path"
    elif (path / STATE_WEIGHTS_FILE).is_file():  # a saved training state (state/step-N) holds the model's weights there
        problem = "is a directory (a saved training state)"
        advice = f"pass {path / STATE_WEIGHTS_FILE} or the run's model.pth"
    else:
        advice = "pass the model.pth file that `fmnist-dist train` wrote"
    raise UsageError(f"checkpoint {path} {problem}; {advice}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as error:
        raise UsageError(
            f"checkpoint {path} is not a readable safetensors file ({first_line(error)}); re-save it or train again"
        ) from error


def _read_torch_save(path: Path) -> dict[str, torch.Tensor]:
    with path.open("rb") as f:
        start = f.read(len(ZIP_MAGIC))
    # torch.save writes a zip archive (a pickle, protocol 2 or later, with the legacy format); anything else,
    # such as a text file, is not for torch.load, whose pickle reader would misname it.
    if not start.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        raise UsageError(
            f"checkpoint {path} is not a PyTorch checkpoint (not the zip archive or pickle that "
            "torch.save writes): another kind of file, or truncated or corrupted; pass a model.pth "
            "(re-save it or train again)"
        )
    try:
        with warnings.catch_warnings():
            # torch warns that it validates sparse tensors; they are refused right after (_weight_problem).
            warnings.filterwarnings("ignore", "Validating sparse tensor invariants", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UsageError(
            f"checkpoint {path} was refused: loading it would {_forbidden_action(error)}, not just read weights; "
            "load only state_dicts saved by torch.save(model.state_dict()) (re-save a whole pickled model that way)"
        ) from error
    except Exception as error:
        raise UsageError(
            f"checkpoint {path} is truncated or corrupted ({_first_sentence(error)}); re-save it or train again"
        ) from error
    if not isinstance(state, dict):
        raise UsageError(
            f"checkpoint {path} holds a {type(state).__name__}, not a state_dict; "
            "save it with torch.save(model.state_dict(), path)"
        )
    if not_tensors := sorted(str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)):
        raise UsageError(
            f"checkpoint {path} is a dict but not a state_dict (not tensors: {not_tensors[:5]}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return state


def _weight_problem(tensor: torch.Tensor) -> tuple[str, str] | None:
    """What makes a saved tensor unusable as a weight, and what to do, or None for a usable one."""
    resave = "save the weights of a trained model with torch.save(model.state_dict(), path)"
    if tensor.is_meta:
        return "is a meta tensor (a shape without values)", resave
    if tensor.layout != torch.strided:
        return f"is a sparse tensor ({tensor.layout}), not dense weights", f"convert it with .to_dense(), or {resave}"
    if not tensor.is_floating_point():
        return f"holds {tensor.dtype} values, not floating-point weights", resave
    if not torch.isfinite(tensor).all():
        return "holds non-finite values (NaN or infinity)", "train again (a run that diverged; try a lower --lr)"
    return None


def _forbidden_action(error: pickle.UnpicklingError) -> str:
    """What the refused pickle asked for, from torch's message (which also advises the unsafe way round)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
    return f"call {found.group(1)}" if found else "build arbitrary objects"


def _first_sentence(error: BaseException) -> str:
    """The error's type and the first sentence of its message (torch's go on for a paragraph)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].split('. ')[0]}" if text else type(error).__name__


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
