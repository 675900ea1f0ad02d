"""Saving and loading the final weights: atomic writes and checks that turn a bad file into a clear message."""

from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
from torch import nn

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.model import NeuralNetwork


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` so that a crash at any moment leaves either its old contents or its new ones.

    `write` fills a hidden temporary file in the same directory, which is flushed to disk and then renamed over
    `path` (a rename within one file system is atomic). The new file gets the old one's permissions, or, for a
    new file, those a plain `open` would give it.

    Raises:
        UsageError: the file system refused (a full disk, no permission); the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with reporting_write_errors(path, f"the previous {path.name}, if any, is unchanged; free some space or fix "
                                      "the file system, then run again"):
        # os.open applies the umask as open() does (tempfile.mkstemp would make the file private to its owner).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                if path.exists():
                    os.chmod(f.fileno(), stat.S_IMODE(path.stat().st_mode))
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync_directory(path.parent)  # make the rename itself survive a power loss


@contextmanager
def reporting_write_errors(path: Path, advice: str) -> Iterator[None]:
    """Turn a failure to write `path` (a file or a directory) into a UsageError naming it, the cause and `advice`.

    Only failures of the file system are turned: an OSError anywhere in the exception's chain, or any error
    while the file system is full (writers such as torch.save and safetensors report a full disk in their
    own words, "unexpected pos 1280 vs 1174"). Any other error (a bug) passes through unchanged.
    """
    try:
        yield
    except Exception as error:
        cause = write_failure_cause(error, Path(path))
        if cause is None:
            raise
        raise UsageError(f"could not write {path}: {cause}; {advice}") from error


def write_failure_cause(error: BaseException, path: Path) -> str | None:
    """Why writing `path` failed, in the system's words ("no space left on device"), or None for a bug."""
    chain = _exception_chain(error)
    for link in chain:
        if isinstance(link, OSError):
            return (link.strerror or first_line(link)).lower()
    text = " ".join(str(link) for link in chain)
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in text:
            return os.strerror(code).lower()
    if _free_bytes(path) == 0:
        return os.strerror(errno.ENOSPC).lower()
    return None


def _exception_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer can still use on the file system of `path` (or of its nearest parent)."""
    for candidate in (path, *path.parents):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open directories: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
            f"checkpoint {path} was refused: loading it would {_forbidden_action(error)}, not just read weights; "
            "load only state_dicts saved by torch.save(model.state_dict()) (re-save a whole pickled model that way)"
        ) from error
    except Exception as error:  # noqa: BLE001 - a damaged file fails anywhere in the zip or pickle readers
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
