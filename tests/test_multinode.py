"""Two machines of one job through `launch/multi-node.yaml`, without SLURM, as the README's multi-node section runs
them: one `accelerate launch --machine_rank 0|1` per machine on the loopback address, one CPU process each."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import launch_cli, launch_two_nodes, train_args

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def two_node_run(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[subprocess.CompletedProcess], Path]:
    output_dir = tmp_path_factory.mktemp("two-node") / "out"
    args = train_args(data_dir, output_dir, "--cpu", "--no-progress")
    return launch_two_nodes([args, args], cwd=output_dir.parent), output_dir


@pytest.fixture(scope="module")
def one_node_weights(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The same training as two processes on one machine (launch/cpu.yaml)."""
    output_dir = tmp_path_factory.mktemp("one-node") / "out"
    result = launch_cli(train_args(data_dir, output_dir, "--cpu", "--no-progress"), cwd=output_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output_dir / "model.pth", weights_only=True)


def test_two_node_launch_exits_0_on_both_machines(two_node_run) -> None:
    results, _ = two_node_run

    assert [result.returncode for result in results] == [0, 0], [result.stderr[-2000:] for result in results]


def test_two_node_launch_writes_one_model_trained_by_two_processes(two_node_run) -> None:
    _, output_dir = two_node_run

    assert list(output_dir.parent.rglob("model.pth")) == [output_dir / "model.pth"]
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(record["world_size"] == 2 for record in metrics)


def test_two_node_launch_matches_two_processes_on_one_machine(two_node_run, one_node_weights) -> None:
    _, output_dir = two_node_run

    weights = torch.load(output_dir / "model.pth", weights_only=True)
    assert weights.keys() == one_node_weights.keys()
    assert max((weights[key] - one_node_weights[key]).abs().max().item() for key in weights) <= 1e-6
