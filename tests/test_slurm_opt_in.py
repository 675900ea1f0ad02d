"""`pytest` never installs packages, starts daemons or edits /etc/hosts unasked: the SLURM tests start their own
cluster only when FMNIST_DIST_SLURM_SETUP=1 opts in, and otherwise use a cluster that is up, or skip with a reason
that says how to opt in; with FMNIST_DIST_REQUIRE_SLURM=1 (CI) a missing cluster fails them instead.

Decided in this process from the environment; no cluster is started or stopped here.
"""

from __future__ import annotations

import subprocess

import pytest
import test_slurm
from test_slurm import REQUIRE_VARIABLE, SETUP_VARIABLE, ClusterPlan, cluster_plan, slurm_unavailable

ROOT_WITH_APT = None  # why_slurm_cannot_start() as root on Linux with apt-get: nothing stops a start
NOT_ROOT = "starting the SLURM test cluster needs root (`sudo .ci/slurm-cluster.sh up`)"


@pytest.mark.parametrize("opted_in", [False, True])
def test_a_cluster_that_is_up_is_used_with_or_without_opt_in(opted_in: bool) -> None:
    env = {SETUP_VARIABLE: "1"} if opted_in else {}
    assert cluster_plan(env, cluster_up=True, cannot_start=ROOT_WITH_APT) == (ClusterPlan.USE, "")


@pytest.mark.parametrize("value", [None, "", "0", "yes"])
def test_without_opt_in_no_cluster_is_started_even_as_root_with_apt_get(value: str | None) -> None:
    """The case that installed slurmctld, slurmd and munge and edited /etc/hosts under a plain `pytest`."""
    env = {} if value is None else {SETUP_VARIABLE: value}
    plan, reason = cluster_plan(env, cluster_up=False, cannot_start=ROOT_WITH_APT)
    assert plan is ClusterPlan.UNAVAILABLE
    assert f"set {SETUP_VARIABLE}=1" in reason and "apt-get" in reason and "/etc/hosts" in reason


def test_with_opt_in_a_cluster_is_started_where_it_can_be() -> None:
    assert cluster_plan({SETUP_VARIABLE: "1"}, cluster_up=False, cannot_start=ROOT_WITH_APT) == (ClusterPlan.START, "")


def test_with_opt_in_a_machine_that_cannot_start_one_says_why() -> None:
    plan, reason = cluster_plan({SETUP_VARIABLE: "1"}, cluster_up=False, cannot_start=NOT_ROOT)
    assert (plan, reason) == (ClusterPlan.UNAVAILABLE, f"{SETUP_VARIABLE}=1, but {NOT_ROOT}")


def test_an_unavailable_cluster_skips_the_tests_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no SLURM test cluster is up"):
        slurm_unavailable("no SLURM test cluster is up")


def test_an_unavailable_cluster_fails_the_tests_where_one_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_VARIABLE}=1 but no SLURM test cluster is up"):
        slurm_unavailable("no SLURM test cluster is up")


@pytest.fixture
def cluster_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The `.ci/slurm-cluster.sh` commands the tests' set-up runs, on a machine where none is up, as root with apt-get
    (recorded instead of run)."""
    commands: list[str] = []

    def cluster_script(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        commands.append(command)
        return subprocess.CompletedProcess([command], returncode=1 if command == "status" else 0, stdout="", stderr="")

    monkeypatch.setattr(test_slurm, "cluster_script", cluster_script)
    monkeypatch.setattr(test_slurm, "why_slurm_cannot_start", lambda: ROOT_WITH_APT)
    monkeypatch.delenv(REQUIRE_VARIABLE, raising=False)
    return commands


def test_the_set_up_only_looks_without_opt_in(cluster_commands: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SETUP_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{SETUP_VARIABLE}=1"), test_slurm.slurm_cluster():
        pass
    assert cluster_commands == ["status"]


def test_the_set_up_starts_and_stops_a_cluster_when_opted_in(
    cluster_commands: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SETUP_VARIABLE, "1")
    with test_slurm.slurm_cluster() as env:
        assert cluster_commands == ["status", "up"] and env["SLURM_CONF"] == str(test_slurm.SLURM_CONF)
    assert cluster_commands == ["status", "up", "down"]
