"""The package layers as users and drivers meet them (the import contract itself: `lint-imports`)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_parallel_pipeline_is_imported_from_actors_and_the_old_spelling_says_so():
    import actors
    from actors.parallel_pipeline import ParallelStableDiffusion3Pipeline

    assert actors.ParallelStableDiffusion3Pipeline is ParallelStableDiffusion3Pipeline
    with pytest.raises(ImportError, match="from actors import ParallelStableDiffusion3Pipeline"):
        from pipelines import ParallelStableDiffusion3Pipeline  # noqa: F401


def test_the_batch_job_driver_and_the_cli_do_not_load_paddle():
    code = (
        "import sys, jobs.batch_generate, jobs.cli, actors.replica;"
        "print(sorted(m for m in ('paddle', 'pipelines', 'paddlenlp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_training_config_and_device_settings_do_not_load_paddle():
    # `sd3 train --device npu --local` sets the NPU flags (pipelines.training.devices) after
    # reading its config and before Paddle loads.
    code = (
        "import sys, jobs.train_cli, pipelines.training.config, pipelines.training.devices;"
        "print(sorted(m for m in ('paddle', 'paddlenlp', 'pipelines.stable_diffusion_3') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
