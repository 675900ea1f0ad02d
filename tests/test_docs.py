"""The documentation cannot drift: the site builds strictly, the CLI reference covers the parser, and every
command block a user would copy from README.md and docs/ runs as written.

Each fenced block in README.md and docs/**/*.md says its language. `bash` and `python` blocks are run, in
their page's order, in one working directory per page that holds what a user's clone and first run give:
`launch/` and `benchmarks/` of this repository, a small synthetic FashionMNIST in `./data` (where the
commands look by default, so nothing is downloaded) and two photos for `predict --image` (`shoe.jpg`,
`shirt.png`). W&B is disabled there (WANDB_MODE=disabled), and there is no GPU.

A block that needs what CI lacks (a GPU, real node addresses, the network, a SLURM cluster, minutes of
machine time) has `<!-- not-run: REASON -->` on the line before it. Those blocks are listed, with their
reasons, at the end of the pytest run, and by `python tests/test_docs.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import cli_env
from PIL import Image, ImageDraw

from fmnist_dist.inputs.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
RUN = {"bash", "python"}
# Languages of blocks that are shown, never run: output, files, and the reference trees.
SHOWN = {"text", "yaml", "toml", "json"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[^`\s]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!-- not-run: (?P<reason>.+?) -->\s*$")
# Small enough for seconds per run, large enough for a few steps per epoch and `predict --index 0 1 2`.
SANDBOX_TRAIN_IMAGES = 256
SANDBOX_TEST_IMAGES = 64


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int  # of the opening fence, counted from 1
    lang: str
    code: str
    not_run: str | None  # the reason, where the block is marked not to be run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, in order."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    number = 0
    while number < len(lines):
        fence = FENCE.match(lines[number])
        if not fence:
            number += 1
            continue
        indent = len(fence["indent"])
        end = next(i for i in range(number + 1, len(lines)) if lines[i].strip() == "```")
        code = "\n".join(line[indent:] for line in lines[number + 1 : end]) + "\n"
        marker = NOT_RUN.match(lines[number - 1]) if number else None
        found.append(Block(page, number + 1, fence["lang"], code, marker["reason"] if marker else None))
        number = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
PAGES_TO_RUN = [page for page in PAGES if any(b.lang in RUN and b.not_run is None for b in blocks(page))]


def test_every_block_says_its_language() -> None:
    """A block without a language (or with an unknown one) could be a command that no test runs."""
    unknown = [f"{b.where} ({b.lang or 'no language'})" for b in ALL_BLOCKS if b.lang not in RUN | SHOWN]
    assert not unknown, f"blocks that are neither run ({RUN}) nor shown ({SHOWN}): {unknown}"


def test_not_run_markers_precede_runnable_blocks() -> None:
    """A marker before an output block would hide nothing and clutter the list of blocks not run."""
    misplaced = [b.where for b in ALL_BLOCKS if b.not_run is not None and b.lang not in RUN]
    assert not misplaced


@pytest.mark.integration
@pytest.mark.slow
# Each page in its own xdist group (the others of a file share one: tests/conftest.py): the pages share nothing,
# and together they are the suite's longest file, which one worker alone would finish minutes after the rest.
@pytest.mark.parametrize(
    "page",
    [pytest.param(page, marks=pytest.mark.xdist_group(f"docs-{page.name}")) for page in PAGES_TO_RUN],
    ids=[str(p.relative_to(REPO)) for p in PAGES_TO_RUN],
)
def test_command_blocks_run(page: Path, tmp_path: Path) -> None:
    """Every bash and python block of the page, in order, in a working directory like a user's clone."""
    sandbox = _sandbox(tmp_path)
    env = _sandbox_env()
    for block in blocks(page):
        if block.lang not in RUN or block.not_run is not None:
            continue
        command = ["bash", "-euo", "pipefail", "-c", block.code] if block.lang == "bash" else [sys.executable]
        stdin = block.code if block.lang == "python" else None
        result = subprocess.run(command, cwd=sandbox, env=env, input=stdin, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (
            f"{block.where} exited {result.returncode}\n{block.code}\nstdout:\n{result.stdout[-3000:]}\n"
            f"stderr:\n{result.stderr[-3000:]}"
        )


def test_blocks_not_run_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    """The blocks not run, with their reasons, printed in the test run's output (one place to review them)."""
    not_run = [b for b in ALL_BLOCKS if b.not_run is not None]
    assert all(b.not_run.strip() for b in not_run)
    with capsys.disabled():
        print(f"\ndocumentation blocks not run ({len(not_run)}):")
        for line in _not_run_lines(not_run):
            print(f"  {line}")


def test_quickstart_set_up_and_test_commands_are_what_ci_runs() -> None:
    """README's Quickstart is marked not-run because .ci/run runs its set-up and test lines; hold it to that."""
    quickstart = next(b for b in blocks(REPO / "README.md") if b.lang == "bash")
    ci = {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}
    commands = [line.split("#")[0].strip() for line in quickstart.code.splitlines()]
    setup_and_test = [command for command in commands if command.startswith(("pip ", "pytest"))]
    assert setup_and_test, quickstart.code
    assert [command for command in setup_and_test if command not in ci] == []


def test_readme_links_point_into_the_clone() -> None:
    """Every relative link of README.md names a file of the repository (no ../shared, no missing page)."""
    readme = (REPO / "README.md").read_text()
    targets = [target.split("#")[0] for target in re.findall(r"\]\(([^)]+)\)", readme)]
    missing = [t for t in targets if t and "://" not in t and not (REPO / t).exists()]
    assert missing == []


def test_cli_reference_names_every_flag() -> None:
    """The generated reference holds every subcommand and flag of the parser (it is built from it)."""
    from fmnist_dist.cli import build_parser

    reference = _hooks().cli_reference()
    subcommands = build_parser()._subparsers._group_actions[0].choices  # argparse has no public accessor
    for name, parser in subcommands.items():
        assert f"## `fmnist-dist {name}`" in reference
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):  # said once, atop the page
                continue
            for flag in action.option_strings:
                assert f"`{flag}`" in reference, (name, flag)


def test_cli_reference_gives_each_declared_flags_range_and_default() -> None:
    """Ranges, defaults and help come from the settings' declarations: train's flags hold no argparse default (a
    flag not given stays out of the namespace), and their --help adds "(default: ...)" to the help."""
    reference = _hooks().cli_reference()
    train = reference.split("## `fmnist-dist evaluate`")[0]
    rows = {row.split(" | ")[0].removeprefix("| "): row for row in train.splitlines() if row.startswith("| `--")}
    assert rows["`--epochs`"] == "| `--epochs` | passes over the training set | `5` | integer, 1 to 2^31-1 |"
    assert rows["`--momentum`"].endswith("| `0.9` | number, at least 0, below 1 |")
    assert rows["`--lr`"].endswith("| `0.12` | number, more than 0, at most 3.403e+38 |")
    assert rows["`--num-workers`"].endswith("| `0` | integer, 0 to the machine's CPU count |")
    assert rows["`--output-dir`"].endswith("| `checkpoints` | non-empty path |")
    assert rows["`--resume`"].endswith("|  | `auto` \\| `STATE_DIR`, may also be given without a value |")
    assert "==SUPPRESS==" not in reference
    assert "| `--train-size` | training images (1-1000000) | `60000` | integer, 1 to 1000000 |" in reference


def test_metrics_reference_has_a_row_per_field() -> None:
    """The generated metrics.jsonl table has one row per `EpochRecord` field, in the JSON's order, with its tracker
    name; a field without its line in the docstring's Attributes: fails the build instead."""
    from fmnist_dist.storage.metrics_log import TRACKER_KEY, EpochRecord

    cells = [[cell.strip() for cell in row.split(" | ")] for row in _hooks().metrics_fields().splitlines()[2:]]
    fields = dataclasses.fields(EpochRecord)
    assert [row[0] for row in cells] == [f"| `{f.name}`" for f in fields]
    tracker_names = [f"`{f.metadata[TRACKER_KEY]}`" if TRACKER_KEY in f.metadata else "" for f in fields]
    assert [row[3] for row in cells] == tracker_names


@pytest.mark.integration
@pytest.mark.slow
def test_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link, a page missing from the navigation or a bad anchor fails."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "resume" in (tmp_path / "site" / "search" / "search_index.json").read_text()


def _hooks() -> types.ModuleType:
    """docs/hooks/generated_reference.py, the MkDocs hook that generates the reference pages (not a package)."""
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import generated_reference
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    return generated_reference


def _sandbox(root: Path) -> Path:
    """A working directory as a user's clone has it after a first download, with two photos to predict."""
    for name in ("launch", "benchmarks"):
        (root / name).symlink_to(REPO / name)
    write_synthetic_dataset(root / "data", SANDBOX_TRAIN_IMAGES, SANDBOX_TEST_IMAGES, seed=0)
    _photo(root / "shoe.jpg", garment="black", background="white")
    _photo(root / "shirt.png", garment="navy", background="lightgray")
    return root


def _photo(path: Path, garment: str, background: str) -> None:
    image = Image.new("RGB", (120, 90), background)
    ImageDraw.Draw(image).rectangle((20, 30, 100, 70), fill=garment)
    image.save(path)


def _sandbox_env() -> dict[str, str]:
    # The interpreter's own bin first: `fmnist-dist`, `accelerate` and `python` are this environment's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return cli_env(WANDB_MODE="disabled", PATH=path, PYTHONPATH=_pythonpath())


def _pythonpath() -> str:
    # This checkout's package, also where the environment's editable install points elsewhere.
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _not_run_lines(not_run: list[Block]) -> list[str]:
    return [f"{b.where}: {b.not_run}" for b in not_run]


if __name__ == "__main__":
    print("\n".join(_not_run_lines([b for b in ALL_BLOCKS if b.not_run is not None])))
