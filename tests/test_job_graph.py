"""The batch job's plan and graph alone: no cluster, no rendering."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.pool_placement import PoolPlacementGroups
from actors.replica import ReplicaSpec
from jobs.generate_stage import ITEM_SCHEMA, RESULT_SCHEMA
from jobs.job_config import JobConfig, JobError
from jobs.job_graph import SUMMARY_COLUMNS, graph_stages, read_stage
from jobs.job_preflight import plan_job
from jobs.prompt_table import ReadUnit
from jobs.work_rows import JobDefaults
from tests.reference_cases import fixture_path

MODEL = fixture_path("sd3-tiny")


def _plan(tmp_path, **config):
    table = pa.table({"id": ["a", "b"], "prompt": ["a cube", "a dog"], "note": [1.5, 2.5],
                      "num_images": [1, 2]})  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    cfg = JobConfig(output=str(tmp_path / "out"), prompts=str(tmp_path / "t.parquet"), model=str(MODEL),
                    defaults=JobDefaults(num_inference_steps=2), **config)  # fmt: skip
    return cfg, plan_job(cfg)


def test_the_plan_resolves_the_model_defaults_and_writes_nothing(tmp_path):
    _, plan = _plan(tmp_path)
    assert plan.total_rows == 2 and len(plan.units) == 1 and plan.passthrough.names == ["note"]
    assert plan.defaults.height == plan.defaults.width == 128 and plan.defaults.max_sequence_length == 256
    assert plan.previous is None and not plan.known.done
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_each_stage_reads_only_columns_its_predecessor_gives(tmp_path):
    config, plan = _plan(tmp_path, replicas=3, cpus_per_replica=2.0)
    read, generate, write = graph_stages(plan, config, frozenset(), frozenset())
    assert [s.name for s in (read, generate, write)] == ["read", "generate", "write"]
    # The read stage really produces the items the generate stage declares it reads.
    items = read.fn(pa.Table.from_pylist([plan.units[0].as_dict()]), **read.options["fn_kwargs"])
    assert items.num_rows == 3  # one item per image: 1 + 2
    assert set(generate.input_columns) <= set(items.column_names)
    assert items.schema.names == [*ITEM_SCHEMA.names, "note"]  # the pass-through column rides along
    assert set(write.input_columns) <= set(RESULT_SCHEMA.names)
    assert set(ReadUnit.__dataclass_fields__) == set(read.input_columns)
    # Where each stage runs: I/O tasks never wait for CPUs the replicas hold; one actor per replica.
    assert read.options["num_cpus"] == 0 and write.options["num_cpus"] == 0
    assert generate.options["num_cpus"] == 2.0 and generate.options["batch_size"] == config.batch_size
    assert generate.options["compute"].min_size == generate.options["compute"].max_size == 3
    assert read.fn is read_stage and set(SUMMARY_COLUMNS) <= set(RESULT_SCHEMA.names)


def test_a_bad_plan_is_refused_before_any_stage(tmp_path):
    with pytest.raises(JobError, match="--model"):
        plan_job(JobConfig(output=str(tmp_path / "out"), prompt_list=["x"], model=str(tmp_path / "nope")))
    assert not (tmp_path / "out").exists()


def test_a_replica_group_pool_places_each_actor_in_a_placement_group_of_its_own(tmp_path):
    config, plan = _plan(tmp_path, replicas=2, cfg_parallel=True, cpus_per_replica=2.0)
    with pytest.raises(ValueError, match="PoolPlacementGroups"):
        graph_stages(plan, config, frozenset(), frozenset())
    placements = PoolPlacementGroups(plan.spec, config.replicas)
    _, generate, _ = graph_stages(plan, config, frozenset(), frozenset(), placements)
    assert generate.options["ray_remote_args_fn"] is placements and not placements.groups  # made by Ray Data
    # The pool actor takes a token CPU share of its group's last bundle; bundle r is rank r's.
    assert generate.options["num_cpus"] == 0.01 and "num_gpus" not in generate.options
    assert plan.spec.pool_bundles() == [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 0.01}]
    assert plan.spec.total_resources(2) == {"CPU": pytest.approx(8.02)}
    gpus = ReplicaSpec(model=str(MODEL), device="gpu", cfg=2)  # 2 ranks of `ray start --num-gpus=4`
    assert gpus.pool_bundles() == [{"CPU": 1.0, "GPU": 1.0}] * 2 + [{"CPU": 0.01}]
    assert gpus.total_resources(2) == {"CPU": pytest.approx(4.02), "GPU": 4.0}
