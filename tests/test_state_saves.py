"""Saved training states, in-process: at every instant of every save, replacement and pruning `--resume auto` finds
a complete state, the newest there is; a failed save says what is true and what to do for its cause; every file
gets the mode the umask gives; a restored state is checked tensor by tensor against the model and optimizer."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.position import TrainingPosition
from fmnist_dist.storage.atomic_files import reporting_write_errors
from fmnist_dist.storage.output_dir import remove_earlier_run
from fmnist_dist.storage.run_dir import (
    COMPLETE_PREFIX,
    PROGRESS_FILE,
    STATE_WEIGHTS_FILE,
    STATES_DIR,
    TMP_PREFIX,
    TRASH_PREFIX,
    is_state_name,
)
from fmnist_dist.storage.training_state import (
    Progress,
    complete_states,
    find_state,
    finish_interrupted_saves,
    read_progress,
    restore_state,
    save_training_state,
)


class Killed(BaseException):
    """The process died here: no `except Exception` clean-up runs, and nothing more reaches the disk."""


# Every call that changes what is on disk under a name: a kill lands before any one of them.
CHANGES = ("mkdir", "rename", "replace", "unlink", "rmdir", "chmod", "link")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


class Killer:
    """Counts the file system changes; from the `at`-th on (0: the first), each one raises Killed instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int | None = None) -> None:
        self.at, self.count = at, 0
        for name in CHANGES:
            monkeypatch.setattr(os, name, self._counted(getattr(os, name)))
        real_open = os.open
        counted_open = self._counted(real_open)
        monkeypatch.setattr(
            os,
            "open",
            lambda path, flags, *a, **k: (counted_open if flags & WRITE_FLAGS else real_open)(path, flags, *a, **k),
        )

    def _counted(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def change(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            if self.at is not None and self.count > self.at:
                raise Killed
            return real(*args, **kwargs)

        return change


@pytest.fixture(scope="module")
def accelerator() -> Iterator[Accelerator]:
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # for other tests' Accelerators, of other settings


def trained(accelerator: Accelerator) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small prepared model and SGD optimizer with momentum buffers (one step taken), the only ones that
    `accelerator` saves and restores."""
    accelerator.free_memory()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    progress = Progress(TrainingPosition(epoch=0, samples_done=step, global_step=step), dataset_size=10**6)
    progress.world_size = progress.per_process_batch = progress.global_batch_size = 1
    return save_training_state(accelerator, output_dir, progress, keep)


def names(output_dir: Path) -> list[str]:
    root = output_dir / STATES_DIR
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def identity(state: Path | None) -> tuple[int, int] | None:
    """(save index, step) of the state at `state`: what it is, whatever its directory's name."""
    if state is None:
        return None
    progress = read_progress(state)
    return progress.save_index, progress.global_step


def assert_resumable(accelerator: Accelerator, state: Path) -> None:
    """The state restores into the model and optimizer that `accelerator` holds (those it saved)."""
    model, optimizer = accelerator._models[0], accelerator._optimizers[0]
    restore_state(accelerator, state, model, optimizer)


# (earlier saves as (step, keep), then the save that is killed)
SEQUENCES = {
    "first-save": ([], (5, 1)),
    "new-step-pruning-two": ([(5, 3), (10, 3)], (15, 1)),
    "new-step-keeping-two": ([(5, 3), (10, 3)], (15, 2)),
    "same-step-replaced": ([(10, 1)], (10, 1)),  # a state every 125 steps on a 125-step epoch, --keep-states 1
    "same-step-replaced-and-pruning": ([(5, 3), (10, 3)], (10, 1)),
}


@pytest.fixture(scope="module")
def earlier_states(accelerator: Accelerator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    trained(accelerator)
    made = {}
    for name, (earlier, _) in SEQUENCES.items():
        made[name] = tmp_path_factory.mktemp(name) / "out"
        made[name].mkdir()
        for step, keep in earlier:
            save(accelerator, made[name], step, keep)
    return made


def kill_points(start: Path, work: Path, run: Callable[[Path], object]) -> int:
    """How many file system changes `run` makes on a copy of `start` (a kill can land before each, or after all)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        killer = Killer(monkeypatch)
        out = Path(shutil.copytree(start, work / f"count-{len(list(work.iterdir()))}"))
        run(out)
    return killer.count


def killed_at(at: int, start: Path, work: Path, run: Callable[[Path], object]) -> Path:
    """A copy of `start` after `run` was killed before its `at`-th file system change."""
    out = Path(shutil.copytree(start, work / f"killed-{at}"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        Killer(monkeypatch, at)
        with contextlib.suppress(Killed):
            run(out)
    return out


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_a_kill_at_any_instant_of_a_save_leaves_the_newest_complete_state_resumable(
    sequence: str, accelerator: Accelerator, earlier_states: dict[str, Path], tmp_path: Path
) -> None:
    start = earlier_states[sequence]
    step, keep = SEQUENCES[sequence][1]
    newest_before = identity(find_state(start, "auto"))
    trained(accelerator)

    def run(out: Path) -> object:
        return save(accelerator, out, step, keep)

    changes = kill_points(start, tmp_path, run)
    assert changes > 10
    new_state_found = False
    for at in range(changes + 1):
        out = killed_at(at, start, tmp_path, run)
        found = find_state(out, "auto")
        found_id = identity(found)
        # The state found is the newest complete one: the one before the save until the new one is complete,
        # then the new one; never an older one (pruned or replaced) and never nothing where a state was.
        if found_id != newest_before:
            assert found_id == (1 + (newest_before or (0, 0))[0], step), (at, found)
            new_state_found = True
        else:
            assert not new_state_found, f"killed before change {at}: back to the older state {found}"
        if found is not None:
            assert_resumable(accelerator, found)
        # What `--resume auto` does on claiming the directory, and the next save, keep it.
        finish_interrupted_saves(out / STATES_DIR)
        assert identity(find_state(out, "auto")) == found_id, at
        assert all(is_state_name(name) for name in names(out)), at
        if at % 5 == 0:  # a save is slow for so many cases: every fifth shows the next save tidies up
            save(accelerator, out, 20, 1)
            assert names(out) == ["step-000000020"], at
        shutil.rmtree(out)
    assert new_state_found


def test_a_kill_at_any_instant_of_finishing_an_interrupted_save_keeps_its_state(
    accelerator: Accelerator, earlier_states: dict[str, Path], tmp_path: Path
) -> None:
    start = earlier_states["same-step-replaced-and-pruning"]
    # killed once the new state of step 10 was complete, before it replaced the older one
    interrupted = tmp_path / "interrupted"
    changes = kill_points(start, tmp_path, lambda out: save(accelerator, out, 10, 1))
    for at in range(changes):
        out = killed_at(at, start, tmp_path, lambda out: save(accelerator, out, 10, 1))
        if any(p.name.startswith(COMPLETE_PREFIX) for p in (out / STATES_DIR).iterdir()):
            out.rename(interrupted)
            break
        shutil.rmtree(out)
    expected = identity(find_state(interrupted, "auto"))
    assert expected == (3, 10)

    def finish(out: Path) -> None:
        finish_interrupted_saves(out / STATES_DIR)

    for at in range(kill_points(interrupted, tmp_path, finish) + 1):
        out = killed_at(at, interrupted, tmp_path, finish)
        assert identity(find_state(out, "auto")) == expected, at
        shutil.rmtree(out)


def test_the_named_case_a_kill_between_discarding_the_old_state_and_renaming_the_new_one(
    accelerator: Accelerator, earlier_states: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Path(shutil.copytree(earlier_states["same-step-replaced"], tmp_path / "out"))
    real_rename = Path.rename

    def killed_after_discarding(path: Path, target: Any) -> Any:
        if is_state_name(Path(target).name) and not Path(path).name.startswith(TRASH_PREFIX):
            raise Killed  # the rename of the new state into place
        return real_rename(path, target)

    monkeypatch.setattr(Path, "rename", killed_after_discarding)
    with pytest.raises(Killed):
        save(accelerator, out, 10, 1)
    monkeypatch.undo()

    assert not (out / STATES_DIR / "step-000000010").exists()
    assert identity(find_state(out, "auto")) == (2, 10)
    assert_resumable(accelerator, find_state(out, "auto"))


def test_overwrite_removes_a_complete_state_left_under_its_temporary_name(
    accelerator: Accelerator, earlier_states: dict[str, Path], tmp_path: Path
) -> None:
    out = Path(shutil.copytree(earlier_states["same-step-replaced"], tmp_path / "out"))
    shutil.copytree(out / STATES_DIR / "step-000000010", out / STATES_DIR / f"{COMPLETE_PREFIX}step-000000010")
    remove_earlier_run(accelerator, out)
    assert list((out / STATES_DIR).iterdir()) == [] and find_state(out, "auto") is None


# ------------------------------------------------------------------------------------------ failed saves


def failing_save_state(code: int) -> Callable[..., None]:
    def save_state(output_dir: str) -> None:
        raise OSError(code, os.strerror(code), output_dir)

    return save_state


def failed_save_message(accelerator: Accelerator, output_dir: Path, code: int, monkeypatch: pytest.MonkeyPatch) -> str:
    with monkeypatch.context() as patch:
        patch.setattr(accelerator, "save_state", failing_save_state(code))
        with pytest.raises(UsageError) as refused:
            save(accelerator, output_dir, 30, 1)
    assert [p.name for p in (output_dir / STATES_DIR).iterdir() if p.name.startswith(TMP_PREFIX)] == []
    return str(refused.value)


def test_a_full_disk_at_the_first_save_does_not_speak_of_earlier_states(
    accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained(accelerator)
    message = failed_save_message(accelerator, tmp_path, errno.ENOSPC, monkeypatch)
    assert "no space left on device" in message and "free some space" in message, message
    assert "earlier states are intact" not in message and "no state of this run had been saved yet" in message


def test_a_full_disk_at_a_later_save_says_the_earlier_states_are_intact(
    accelerator: Accelerator, earlier_states: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Path(shutil.copytree(earlier_states["same-step-replaced"], tmp_path / "out"))
    message = failed_save_message(accelerator, out, errno.ENOSPC, monkeypatch)
    assert "earlier states are intact; free some space, then continue with --resume" in message, message
    assert identity(find_state(out, "auto")) == (1, 10)


@pytest.mark.parametrize(
    ("code", "remedy"),
    [
        (errno.EACCES, "make it writable for this user"),
        (errno.EPERM, "make it writable for this user"),
        (errno.EROFS, "remount the file system read-write"),
        (errno.EDQUOT, "free some space or raise your disk quota"),
        (errno.EIO, "fix the file system"),
    ],
)
def test_a_failed_write_gets_the_advice_for_its_cause(code: int, remedy: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as refused, reporting_write_errors(tmp_path / "f", "kept", "go on"):
        raise OSError(code, os.strerror(code))
    message = str(refused.value)
    assert f"could not write {tmp_path / 'f'}: {os.strerror(code).lower()}; kept; {remedy}" in message, message
    assert "free some space" not in message or code == errno.EDQUOT, message


def test_the_clean_up_of_a_failed_save_never_hides_its_error(
    accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained(accelerator)

    def tmp_undeletable(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "rmdir", tmp_undeletable)
    monkeypatch.setattr(os, "unlink", tmp_undeletable)
    with monkeypatch.context() as patch:
        patch.setattr(accelerator, "save_state", failing_save_state(errno.ENOSPC))
        with pytest.raises(UsageError, match="no space left on device"):
            save(accelerator, tmp_path, 30, 1)


# -------------------------------------------------------------------------------------------------- modes


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=["umask-022", "umask-002", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_every_file_of_a_state_gets_the_mode_the_umask_gives(
    accelerator: Accelerator, umask: int, tmp_path: Path
) -> None:
    trained(accelerator)
    state = save(accelerator, tmp_path, 5, 1)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in state.iterdir()}
    assert STATE_WEIGHTS_FILE in modes and PROGRESS_FILE in modes
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))
    assert oct(state.stat().st_mode & 0o777) == oct(0o777 & ~umask)


# --------------------------------------------------------------------------------- restored tensors checked


@pytest.fixture
def saved_state(accelerator: Accelerator, tmp_path: Path) -> Path:
    trained(accelerator)
    return save(accelerator, tmp_path, 5, 1)


def rewrite_weights(state: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    weights = safetensors.torch.load_file(state / STATE_WEIGHTS_FILE)
    change(weights)
    safetensors.torch.save_file(weights, state / STATE_WEIGHTS_FILE, metadata={"format": "pt"})


def rewrite_optimizer(state: Path, change: Callable[[dict[str, Any]], None]) -> None:
    saved = torch.load(state / "optimizer.bin", weights_only=True)
    change(saved)
    torch.save(saved, state / "optimizer.bin")


def set_item(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda weights: weights.update({key: value(weights[key])})


def set_momentum(index: int, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, Any]], None]:
    return lambda saved: saved["state"][index].update(momentum_buffer=value(saved["state"][index]["momentum_buffer"]))


@pytest.mark.parametrize(
    ("rewrite", "problem"),
    [
        (
            lambda s: rewrite_weights(s, set_item("0.weight", lambda t: t.double())),
            "the model's 0.weight is (3, 4) float64, not (3, 4) float32",
        ),
        (
            lambda s: rewrite_weights(s, set_item("2.bias", lambda t: t.fill_(float("nan")))),
            "the model's 2.bias holds non-finite values",
        ),
        (lambda s: rewrite_weights(s, lambda w: w.update(extra=torch.zeros(1))), "differ in their names: ['extra']"),
        (
            lambda s: rewrite_weights(s, set_item("0.bias", lambda t: torch.zeros(4))),
            "the model's 0.bias is (4,) float32, not (3,) float32",
        ),
        (
            lambda s: rewrite_optimizer(s, set_momentum(0, lambda t: t.half())),
            "momentum_buffer of 0.weight is (3, 4) float16, not (3, 4) float32",
        ),
        (
            lambda s: rewrite_optimizer(s, set_momentum(1, lambda t: torch.zeros(5))),
            "momentum_buffer of 0.bias is (5,) float32, not (3,) float32",
        ),
        (
            lambda s: rewrite_optimizer(s, set_momentum(3, lambda t: t.fill_(float("inf")))),
            "momentum_buffer of 2.bias holds non-finite values",
        ),
        (
            lambda s: rewrite_optimizer(s, lambda o: o["param_groups"][0].update(params=[0, 1])),
            "is for 2 parameters, the model has 4",
        ),
        (
            lambda s: rewrite_optimizer(s, lambda o: o["param_groups"][0].update(maximize=True)),
            "its optimizer's maximize is True, not False",
        ),
        (
            lambda s: rewrite_optimizer(s, lambda o: o["param_groups"][0].update(nesterov=True)),
            "its optimizer's nesterov is True, not False",
        ),
    ],
    ids=[
        "weight-dtype",
        "weight-nan",
        "weight-extra",
        "weight-shape",
        "momentum-dtype",
        "momentum-shape",
        "momentum-inf",
        "params",
        "maximize",
        "nesterov",
    ],
)
def test_a_restored_tensor_that_does_not_fit_is_refused_in_one_line_naming_the_state(
    accelerator: Accelerator, saved_state: Path, rewrite: Callable[[Path], None], problem: str
) -> None:
    rewrite(saved_state)
    model, optimizer = trained(accelerator)
    with pytest.raises(UsageError) as refused:
        restore_state(accelerator, saved_state, model, optimizer)
    message = str(refused.value)
    assert message.startswith(f"--resume: the state {saved_state} does not fit this model and optimizer: "), message
    assert problem in message and "\n" not in message, message


def test_a_fitting_state_restores_the_same_tensors(accelerator: Accelerator, saved_state: Path) -> None:
    model, optimizer = trained(accelerator)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    restore_state(accelerator, saved_state, model, optimizer)
    saved = safetensors.torch.load_file(saved_state / STATE_WEIGHTS_FILE)
    assert all(torch.equal(saved[name], param) for name, param in model.state_dict().items())


# ------------------------------------------------------------------------------------------ the run id


def test_a_state_saved_with_its_run_id_under_the_old_name_still_loads(saved_state: Path) -> None:
    progress = json.loads((saved_state / PROGRESS_FILE).read_text())
    progress["wandb_run_id"] = progress.pop("tracker_run_id") or "abc123"
    (saved_state / PROGRESS_FILE).write_text(json.dumps(progress))
    assert read_progress(saved_state).tracker_run_id == "abc123"


def test_the_run_id_is_saved_as_tracker_run_id(saved_state: Path) -> None:
    progress = json.loads((saved_state / PROGRESS_FILE).read_text())
    assert "tracker_run_id" in progress and "wandb_run_id" not in progress


def test_complete_states_lists_a_complete_state_under_its_temporary_name_instead_of_the_older_one(
    saved_state: Path,
) -> None:
    root = saved_state.parent
    newer = Path(shutil.copytree(saved_state, root / f"{COMPLETE_PREFIX}{saved_state.name}"))
    progress = json.loads((newer / PROGRESS_FILE).read_text())
    progress["save_index"] += 1
    (newer / PROGRESS_FILE).write_text(json.dumps(progress))
    assert complete_states(root) == [newer]
    finish_interrupted_saves(root)
    assert complete_states(root) == [saved_state] and identity(saved_state) == (2, 5)


def test_resume_naming_a_complete_state_under_its_temporary_name_takes_it_once_it_has_its_final_name(
    saved_state: Path,
) -> None:
    """`--resume state/.complete-step-N`: the resume's claim of the output directory renames it to step-N first."""
    root = saved_state.parent
    named = root / f"{COMPLETE_PREFIX}{saved_state.name}"
    saved_state.rename(named)
    finish_interrupted_saves(root)  # what claim_output_dir does before the state is looked up
    assert find_state(root.parent, str(named)) == saved_state
