"""A W&B sweep agent without the W&B server: one trial of launch/sweep.yaml, run by wandb's own agent code.

    python tests/helpers/sweep_agent.py --parameters PARAMETERS.json [--run-id ID]
        [--accelerate-config FILE] [--num-processes N] SWEEP

`wandb agent SWEEP` gets two answers from the W&B server: the sweep's command, and a trial (its run id and the
values of the sweep's parameters). It runs the trial with `wandb.wandb_agent.Agent._command_run`, which sets the
trial's environment (WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH; WANDB_DIR where unset), writes the
parameter file that wandb.init reads, expands the command's macros (${env}, ${args_no_boolean_flags}, ...) and
starts it. This script is that code, with the server's answers made here: the command of launch/sweep.yaml (for
a machine without 8 GPUs, with its `--config_file` replaced by --accelerate-config and `--num_processes=N` after it,
as the yaml says to do) and a trial with the values of
PARAMETERS.json (a JSON object {name: value}) under --run-id (default: a new id, as W&B makes them). As `wandb agent
--forward-signals`, it passes the signals it gets to the trial and waits for the trial to end; then it exits with
the trial's exit code (`wandb agent` itself exits 0 whatever its trials did).

`Agent._command_run`, `._sweep_command` and `._run_processes` are wandb's internals (as of wandb 0.31): a wandb that
changes them fails this script, and so the tests that use it, loudly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import wandb
import yaml
from wandb import wandb_agent
from wandb.sdk.launch.sweeps import utils as sweep_utils
from wandb.sdk.lib import runid

SWEEP_CONFIG = Path(__file__).resolve().parents[2] / "launch" / "sweep.yaml"


def sweep_command(sweep_config: dict[str, Any], accelerate_config: str | None, processes: int | None) -> list[str]:
    """The sweep's command, with its Accelerate config and number of processes replaced where given."""
    command = list(sweep_config["command"])
    config = command.index("--config_file") + 1
    if accelerate_config is not None:
        command[config] = accelerate_config
    if processes is not None:
        command.insert(config + 1, f"--num_processes={processes}")
    return command


def run_command(sweep_config: dict[str, Any], run_id: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The server's `run` command for a trial: its run id, the sweep's program and each parameter's value."""
    return {
        "type": "run",
        "run_id": run_id,
        "program": sweep_config.get("program"),
        "args": {name: {"value": value} for name, value in parameters.items()},
    }


def start_trial(
    sweep: str, run_id: str, parameters: dict[str, Any], accelerate_config: str | None, processes: int | None
) -> wandb_agent.AgentProcess:
    """Start one trial as `wandb agent --forward-signals` does; return the process the agent started."""
    # What wandb_agent.run_agent does with the sweep's path before it starts the agent.
    parts = {"entity": None, "project": None, "name": sweep}
    if error := sweep_utils.parse_sweep_id(parts):
        raise SystemExit(error)
    if parts["entity"]:
        wandb.env.set_entity(parts["entity"])
    if parts["project"]:
        wandb.env.set_project(parts["project"])
    os.environ[wandb.env.SWEEP_ID] = parts["name"]
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id=parts["name"], forward_signals=True)
    sweep_config = yaml.safe_load(SWEEP_CONFIG.read_text())
    agent._sweep_command = sweep_command(sweep_config, accelerate_config, processes)
    agent._command_run(run_command(sweep_config, run_id, parameters))
    return agent._run_processes[run_id]


def wait_for(trial: wandb_agent.AgentProcess) -> int:
    """The trial's exit code, once it has ended; the signals that arrive meanwhile go on to it, as in the agent."""
    while True:
        try:
            return trial.wait()
        except (wandb_agent.ShutdownSignal, KeyboardInterrupt):
            continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parameters", type=Path, required=True, help="JSON object {parameter: value}")
    parser.add_argument("--run-id", default=None, help="the trial's W&B run id (default: a new one)")
    parser.add_argument("--accelerate-config", default=None, help="in place of the sweep command's --config_file")
    parser.add_argument("--num-processes", type=int, default=None, help="the trial's processes (default: the config's)")
    parser.add_argument("sweep", help="SWEEP_ID or ENTITY/PROJECT/SWEEP_ID, as `wandb agent` takes it")
    args = parser.parse_args()
    parameters = json.loads(args.parameters.read_text())
    run_id = args.run_id or runid.generate_id()
    return wait_for(start_trial(args.sweep, run_id, parameters, args.accelerate_config, args.num_processes))


if __name__ == "__main__":
    sys.exit(main())
