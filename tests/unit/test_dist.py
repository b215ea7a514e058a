"""World.from_env for torchrun, deepspeed and SLURM environments; SLURM node-list parsing."""

from __future__ import annotations

import pytest

from mtscale.dist import World, expand_nodelist, first_host, port_from_job_id
from mtscale.errors import ConfigError


def test_no_launcher_is_one_process() -> None:
    w = World.from_env({})
    assert (w.rank, w.world_size, w.local_rank, w.num_nodes, w.launcher) == (0, 1, 0, 1, "none")
    assert w.is_main and not w.is_distributed


def test_torchrun_env() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    w = World.from_env(env)
    assert w == World(rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1, num_nodes=2,
                      master_addr="n0", master_port=1234, launcher="torchrun")


def test_deepspeed_env() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "CROSS_RANK": "1", "CROSS_SIZE": "2",
           "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"}
    w = World.from_env(env)
    assert (w.rank, w.local_rank, w.world_size, w.node_rank, w.num_nodes, w.local_world_size) == (3, 1, 4, 1, 2, 2)
    assert (w.master_addr, w.master_port, w.launcher) == ("10.0.0.1", 29600, "deepspeed")


def test_plain_env_infers_nodes() -> None:
    w = World.from_env({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "2"})
    assert (w.node_rank, w.num_nodes, w.launcher) == (1, 2, "env")


def test_slurm_env_maps_to_world() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "2",
           "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS_PER_NODE": "2(x4)", "SLURM_JOB_NODELIST": "gpu[007-010]",
           "SLURM_JOB_ID": "123456"}
    w = World.from_env(env, use_scontrol=False)
    assert (w.rank, w.local_rank, w.world_size, w.node_rank, w.num_nodes, w.local_world_size) == (5, 1, 8, 2, 4, 2)
    assert w.master_addr == "gpu007" and w.launcher == "slurm"
    assert w.master_port == port_from_job_id("123456") == 15000 + 123456 % 20000
    # the port is a pure function of the job id: every task agrees
    assert World.from_env(dict(env, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0"),
                          use_scontrol=False).master_port == w.master_port


def test_slurm_step_overrides_allocation_and_master_addr_wins() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "a1",
           "MASTER_ADDR": "head", "MASTER_PORT": "4000"}
    w = World.from_env(env, use_scontrol=False)
    assert (w.world_size, w.master_addr, w.master_port) == (2, "head", 4000)


def test_torch_vars_take_precedence_over_slurm() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert World.from_env(env).rank == 1


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
    ("a[1-2],b5,c[09-10]", ["a1", "a2", "b5", "c09", "c10"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("login-a,login-b", ["login-a", "login-b"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist, use_scontrol=False) == hosts[0]


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu]1", "gpu[5-2]"])
def test_bad_nodelist_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="SLURM node list"):
        expand_nodelist(bad)


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        World.from_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="RANK"):
        World.from_env({"RANK": "4", "WORLD_SIZE": "2"})


def test_to_env_round_trips() -> None:
    w = World(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1, num_nodes=2,
              master_addr="h", master_port=7, launcher="deepspeed")
    assert World.from_env(w.to_env()) == w


@pytest.mark.parametrize("local_rank,local_ws,count,want", [
    (0, 1, 1, 0), (3, 4, 1, 0),  # one GPU bound per task: always GPU 0 (was: local_rank % 1 = 0 here, but
    (1, 2, 2, 1), (7, 8, 8, 7),  # DeepSpeed was told LOCAL_RANK=3 and failed with an invalid ordinal)
    (1, 2, 8, 1),                # more GPUs than ranks
])
def test_device_index_rule(local_rank: int, local_ws: int, count: int, want: int) -> None:
    from mtscale.dist import device_index

    assert device_index(local_rank, local_ws, count) == want


@pytest.mark.parametrize("local_rank,local_ws,count", [(5, 8, 4), (1, 2, 0)])
def test_device_index_refuses_shared_gpus(local_rank: int, local_ws: int, count: int) -> None:
    from mtscale.dist import device_index

    with pytest.raises(ConfigError, match="GPU|CUDA"):
        device_index(local_rank, local_ws, count)


def test_deepspeed_is_told_the_device_we_use() -> None:
    """Issue 25, item 4: SLURM binds one GPU per task -> every rank's cuda:0; DeepSpeed must get
    LOCAL_RANK=0 for it (it calls set_device(LOCAL_RANK)), not the raw local rank."""
    import torch

    from mtscale.dist import deepspeed_env, device_index

    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "4",
           "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x4)", "MASTER_ADDR": "n1", "SLURM_JOB_ID": "7"}
    w = World.from_env(env, use_scontrol=False)
    dev = torch.device("cuda", device_index(w.local_rank, w.local_world_size, 1))
    got = deepspeed_env(w, dev)
    assert got["LOCAL_RANK"] == "0" and got["RANK"] == "5" and got["WORLD_SIZE"] == "8"
    assert deepspeed_env(w, torch.device("cpu"))["LOCAL_RANK"] == "1"  # CPU: the local rank as is
