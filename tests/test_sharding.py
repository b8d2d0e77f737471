"""Meshes, logical-axis rules and sharded steps.

The mesh tests need 8 devices: tests/sharding_worker.py runs in a subprocess with
`--xla_force_host_platform_device_count=8` (the flag must be set before JAX starts and must not
leak into the other tests of this pytest worker). It compares one step of SFT, the reward model,
DPO and a PPO rollout + update on meshes (8,1,1), (2,4,1), (2,2,2) with the plain one-device steps
(their variants, adapters on a shared base and critic-free groups, on (2,2,2)), checks the shard
shapes, and saves on one mesh and restores onto another.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rto_jax.models import CausalLM, ModelConfig, ScalarHeadModel
from rto_jax.train import sharding
from tests import sharding_cases as cases

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-5


def tiny(**kw):
    return ModelConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, **kw
    )


# ----------------------------------------------------------------------------------------------
# Rules and meshes (one device is enough).


def test_mesh_shape_fills_data():
    assert sharding.mesh_shape(-1, 4, 1, num_devices=8) == (2, 4, 1)
    assert sharding.mesh_shape(num_devices=8) == (8, 1, 1)
    assert sharding.mesh_shape(2, -1, 2, num_devices=8) == (2, 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape(-1, 3, 1, num_devices=8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.mesh_shape(2, 4, 2, num_devices=8)
    mesh = sharding.mesh_from_config({"mesh": {"fsdp": 1}})
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == jax.device_count()


def test_logical_rules_give_partition_specs():
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads"), rules) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("embed", "score"), rules) == P("fsdp")
    # A mesh axis serves one dimension: activations keep fsdp on the batch, not on `embed`.
    assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"))
    overridden = sharding.make_rules("vocab=,batch=data,embed=fsdp+tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), overridden) == P(None, ("fsdp", "tensor"))
    assert sharding.logical_to_spec(("batch",), overridden) == P("data")


def test_unmatched_logical_axis_fails_loudly_with_the_parameter_path():
    mesh = sharding.make_mesh()
    model = CausalLM(tiny(), nnx.Rngs(0))
    model.decoder.layers[1].up_proj.kernel.set_metadata("axes", ("embed", "ffn"))
    with pytest.raises(sharding.ShardingRuleError, match=r"layers.*1.*up_proj.*kernel.*'ffn'"):
        sharding.tree_shardings(nnx.split(model)[1], mesh)
    with pytest.raises(sharding.ShardingRuleError, match="not a mesh axis"):
        sharding.tree_shardings(nnx.split(model)[1], mesh, sharding.make_rules({"mlp": "model"}))


def test_indivisible_dimension_fails_for_parameters_not_for_caches():
    # Checked by arithmetic on the axis sizes: no 3 devices needed.
    assert sharding.logical_to_spec(("embed",), shape=(30,), mesh=_FakeMesh(fsdp=2)) == P("fsdp")
    with pytest.raises(sharding.ShardingRuleError, match="w: dimension 0 .'embed', size 32. is not divisible"):
        sharding.logical_to_spec(("embed",), shape=(32,), mesh=_FakeMesh(fsdp=3), path="w")
    # KV caches (strict=False): 3 kv heads on a 2-way tensor axis stay whole instead of failing.
    spec = sharding.logical_to_spec(("batch", "kv_heads"), shape=(8, 3), mesh=_FakeMesh(tensor=2), strict=False)
    assert spec == P(("data", "fsdp"))


class _FakeMesh:
    """Only what logical_to_spec reads: axis names and sizes."""

    axis_names = sharding.MESH_AXES

    def __init__(self, data=1, fsdp=1, tensor=1):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_state_shardings_cover_params_optimizer_and_scalars():
    mesh = sharding.make_mesh()
    model = ScalarHeadModel(tiny(scan_layers=True), nnx.Rngs(0))
    from rto_jax.train import OptimizerConfig, make_optimizer

    state = sharding.create_sharded_train_state(model, make_optimizer(OptimizerConfig()), mesh)
    shardings = sharding.tree_shardings(state, mesh)
    kernel = shardings.params["decoder"]["layers"]["gate_proj"]["kernel"]
    assert kernel.get_value().spec == P(None, "fsdp", "tensor")
    assert (
        shardings.opt_state[1][0].mu["decoder"]["layers"]["gate_proj"]["kernel"].get_value().spec
        == kernel.get_value().spec
    )
    assert shardings.step.spec == P() and shardings.opt_state[1][0].count.spec == P()
    abstract = sharding.abstract_tree(state, shardings)
    assert isinstance(jax.tree.leaves(abstract)[0], jax.ShapeDtypeStruct)
    cache = CausalLM(tiny(scan_layers=True), nnx.Rngs(0)).init_cache(4, 8)
    assert sharding.kv_cache_shardings(cache, mesh)["k"].spec == P(None, ("data", "fsdp"), "tensor")


def test_sharded_steps_on_one_device_keep_default_behaviour():
    """shardings= on a 1-device mesh gives the same step as the plain factory (and compiles once)."""
    from tests.sharding_cases import run_sft

    plain = run_sft()
    meshed = run_sft(sharding.make_mesh())
    assert abs(plain["loss"] - meshed["loss"]) < TOLERANCE
    for a, b in zip(plain["params"], meshed["params"]):
        np.testing.assert_allclose(a, b, atol=TOLERANCE)


# ----------------------------------------------------------------------------------------------
# 8 simulated devices, in a subprocess.


def _run_mesh_worker() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    # Cheaper LLVM passes: the worker compiles ~25 small programs; results stay within float32 noise.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharding_worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, f"sharding_worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("SUMMARY ") :])


def _check_steps(summary) -> list[str]:
    """One step of SFT, reward model, DPO and a PPO rollout + update (full, and with adapters on a shared base)
    on each mesh equals one device."""
    failures = []
    assert set(summary["cases"]) == {"sft", "reward_model", "dpo", "dpo_lora", "ppo", "ppo_lora", "ppo_groups"}
    for case, results in summary["cases"].items():
        meshes = [str(m) for m in (cases.VARIANT_MESHES if case in cases.VARIANTS else cases.MESHES)]
        assert set(results) == {"reference", *meshes}, (case, sorted(results))
        for mesh in meshes:
            for key, value in results[mesh].items():
                if key == "tokens" and value is not True:
                    failures.append(f"{case} on {mesh}: greedy rollout tokens differ")
                elif key != "tokens" and value > TOLERANCE:
                    failures.append(f"{case} on {mesh}: {key} differs by {value}")
    return failures


def _check_shards(shards) -> list[str]:
    """Parameters and their Adam moments really are split (gate_proj [layers, embed, mlp] -> (None, fsdp, tensor),
    o_proj [layers, heads, embed] -> (None, tensor, fsdp), embedding [vocab, embed] -> (tensor, fsdp))."""
    expected = {
        "(8, 1, 1)": {"gate_proj": [2, 32, 64], "o_proj": [2, 32, 32], "embedding": [16, 32]},  # replicated
        "(2, 4, 1)": {"gate_proj": [2, 8, 64], "gate_proj_mu": [2, 8, 64], "o_proj": [2, 32, 8], "embedding": [16, 8]},
        "(2, 2, 2)": {
            "gate_proj": [2, 16, 32],
            "gate_proj_mu": [2, 16, 32],
            "o_proj": [2, 16, 16],
            "embedding": [8, 16],
        },
    }
    return [
        f"{name} on {mesh}: shard {shards[mesh][name]}, expected {shape}"
        for mesh, names in expected.items()
        for name, shape in names.items()
        if shards[mesh][name] != shape
    ]


def _check_planner(planner) -> list[str]:
    """The planner's parameter, AdamW-state and KV-cache bytes per device equal the measured shards."""
    return [
        f"planner, {name} on {mesh}: {part} planned {planned} B, measured {measured} B"
        for mesh, models in planner.items()
        for name, parts in models.items()
        for part, (planned, measured) in parts.items()
        if planned != measured
    ]


@pytest.mark.slow
def test_eight_devices_meshes_match_one_device_checkpoints_and_planner():
    """All 8-device checks from one subprocess (one run even when pytest-xdist spreads tests over workers)."""
    summary = _run_mesh_worker()
    failures = _check_steps(summary) + _check_shards(summary["shards"]) + _check_planner(summary["planner"])
    checkpoint = summary["checkpoint"]  # saved on (2, 4, 1), restored onto (2, 2, 2)
    if not (checkpoint["equal"] and checkpoint["restored_mesh"] == [2, 2, 2]):
        failures.append(f"checkpoint restored onto another mesh: {checkpoint}")
    if checkpoint["restored_shard"] != [2, 16, 32]:
        failures.append(f"restored gate_proj shard {checkpoint['restored_shard']}, expected [2, 16, 32]")
    loaded = summary["sharded_load"]  # save_pretrained -> load_pretrained onto (2, 4, 1)
    if not (loaded["equal"] and loaded["shardings"]):
        failures.append(f"load_pretrained onto a mesh: values equal {loaded['equal']}, shardings {loaded['shardings']}")
    if loaded["up_proj_shard"] != [8, 64]:  # [embed 32 / fsdp 4, mlp 64]
        failures.append(f"loaded up_proj shard {loaded['up_proj_shard']}, expected [8, 64]")
    if loaded["max_device_bytes"] > loaded["total_bytes"] / 2:
        failures.append(f"a device holds {loaded['max_device_bytes']} of {loaded['total_bytes']} bytes")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# The planner's CLI and the TPU launcher (no devices needed).


def test_planner_cli_reads_a_config(capsys):
    from rto_jax.tools import plan

    assert plan.main(["--config=configs/rto_tldr.py:tiny", "--mesh=1,-1,1", "--num_devices=8", "--no_table"]) == 0
    out = capsys.readouterr().out
    assert "mesh (data, fsdp, tensor) = (1, 8, 1)" in out
    for stage in ("sft", "reward_model", "dpo", "ppo"):
        assert f"\n  {stage} " in out
    # Parameters of the tiny preset: 2 layers of d=64 plus a 2048-token embedding and LM head, float32.
    stages = plan.plan_memory(plan.PRESETS["tiny"], (1, 8, 1))
    assert stages["sft"]["optimizer"] == 2 * stages["sft"]["params"] + 8  # Adam's mu, nu + two int32 counts
    assert stages["ppo"]["total"] > stages["dpo"]["total"] > stages["sft"]["total"]


def test_planner_table_for_a_real_preset():
    from rto_jax.tools import plan

    table = plan.fits_table(plan.Workload(), presets=("smollm2_135m",), slices=(("v5e-8", 8, 16), ("1xT4", 1, 1)))
    row = table.splitlines()[-1]
    # 135M on 8 x 16 GiB with fsdp over all 8 chips fits; a 1 GiB device does not.
    assert re.fullmatch(r"\| smollm2_135m \| 0\.13B \| yes [\d.]+ 1,8,1 \| no [\d.]+ 1,1,1 \|", row), row
    config = plan.model_from_config({"model": {"init_from": "EleutherAI/pythia-1b-deduped@main", "dtype": "bfloat16"}})
    assert config.arch == "gpt_neox" and config.hidden_size == 2048 and config.dtype == "bfloat16"


def test_planner_adapter_columns_hold_the_base_once_and_fit_rto_on_llama3_8b():
    from rto_jax.models import LoraConfig
    from rto_jax.tools import plan

    adapters = LoraConfig(rank=16, alpha=32.0)
    config = plan.PRESETS["llama3_8b"].replace(dtype="bfloat16", remat="full")
    full, lora = (plan.plan_memory(config, (1, 1, 1), plan.Workload(), a) for a in (None, adapters))
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(plan.abstract_params(config)))
    adapter_bytes = lora["sft"]["params"]
    # Rank 16 on all 7 projections of 32 layers: 16 (in + out) float32 values each.
    assert adapter_bytes == 4 * 16 * 32 * (
        2 * 4096 + 2 * (4096 + 1024) + 2 * (4096 + 14336) + (14336 + 4096) + 4096 * 2
    )
    assert lora["sft"]["optimizer"] == 2 * adapter_bytes + 8  # Adam's moments of the adapters only
    assert lora["sft"]["frozen"] == lora["dpo"]["frozen"] == 2 * params  # the bf16 base, DPO's reference included
    # PPO: the base once, plus the DPO policy's and the reward model's adapters (+ its head).
    assert 2 * params < lora["ppo"]["frozen"] < 2 * params + 3 * adapter_bytes
    assert full["ppo"]["params"] + full["ppo"]["frozen"] > 4.5 * 4 * params  # five float32 models apart (2 headless)
    assert lora["ppo"]["kv_cache"] == full["ppo"]["kv_cache"]
    slices = (("1xH100-80G", 1, 80), ("v5e-8", 8, 16))
    rows = {
        name: plan.fits_table(plan.Workload(), presets=("llama3_8b",), slices=slices, adapters=a).splitlines()[-1]
        for name, a in (("full", None), ("lora", adapters))
    }
    assert re.fullmatch(r"\| llama3_8b \| 8\.03B \| no [\d.]+ 1,1,1 \| no [\d.]+ [\d,]+ \|", rows["full"]), rows
    assert re.fullmatch(r"\| llama3_8b \| 8\.03B \| yes [\d.]+ 1,1,1 \| yes [\d.]+ [\d,]+ \|", rows["lora"]), rows


def _launch_dry_run(run_args):
    return subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "experiments" / "launch_tpu.py"),
            "--tpu_name=rto-v4",
            "--zone=us-central2-b",
        ]
        + ["--accelerator_type=v4-32", "--create", "--setup", "--dry_run", "--", *run_args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tpu_launcher_refuses_a_url_workdir():
    proc = _launch_dry_run(["--config=configs/rto_tldr.py:6.9b", "--workdir=gs://bucket/run"])
    assert proc.returncode != 0 and "--workdir=gs://bucket/run" in proc.stderr and "gcsfuse" in proc.stderr


def test_tpu_launcher_dry_run_prints_the_commands():
    run_args = ["--config=configs/rto_tldr.py:6.9b", "--workdir=/mnt/runs/rto 6.9b"]
    proc = _launch_dry_run(run_args)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("gcloud compute tpus tpu-vm create rto-v4 --zone=us-central2-b")
    assert "--accelerator-type=v4-32" in lines[0]
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
    argv = shlex.split(lines[-1])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rto-v4"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv
    remote = shlex.split(next(a for a in argv if a.startswith("--command="))[len("--command=") :])
    assert remote[remote.index("RTO_JAX_DISTRIBUTED=auto") :][:3] == [
        "RTO_JAX_DISTRIBUTED=auto",
        ".venv/bin/python",
        "experiments/run.py",
    ]
    start = remote.index("experiments/run.py") + 1
    assert remote[start : start + 2] == run_args  # passed through unchanged (quoted once for the remote shell)
