"""The `sd3` command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from tests.reference_cases import fixture_path

TINY = ["--model", fixture_path("sd3-tiny"), "--steps", "1", "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for this module's jobs (`sd3 generate` uses a running one instead of starting
    its own; tests/test_hub.py runs one that starts and stops its own)."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_generate_from_prompts_writes_pngs(ray_local, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--prompt", "a red fox", "--prompt", "a cat", "--output", str(out), *TINY]) == 0
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == ["prompt0000_0.png", "prompt0001_0.png"]
    assert Image.open(out / "images" / files[0]).size == (64, 64)


def test_generate_from_parquet_table(ray_local, tmp_path):
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["fox", "../../etc"], "prompt": ["a fox", "a cat"]}), table)
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(table), "--output", str(out), "--num-images", "2", *TINY]) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert "fox_0.png" in names and "fox_1.png" in names and len(names) == 4
    assert all("/" not in n and not n.startswith(".") for n in names)  # the unsafe id was encoded


def test_generate_reports_bad_input(tmp_path, capsys):
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"text": ["a fox"]}), table)
    assert main(["generate", "--prompts", str(table), "--output", str(tmp_path / "o"), *TINY]) == 2
    assert "no `prompt` column" in capsys.readouterr().err


def test_generate_without_model_draws_the_captioned_shapes_with_the_default_model(ray_local, tmp_path):
    from jobs.job_config import DEFAULT_MODEL
    from jobs.manifest import read_manifest
    from pipelines import StableDiffusion3Pipeline
    from sd3_core.folder_defaults import folder_guidance_scale, folder_max_sequence_length
    from tools.default_model.shape_classifier import classify

    out = tmp_path / "out"
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    assert main(["generate", *(a for p in prompts for a in ("--prompt", p)), "--output", str(out)]) == 0
    for i, want in enumerate([("red", "black"), ("blue", "white")]):
        image = Image.open(out / "images" / f"prompt{i:04d}_0.png")
        assert image.size == (64, 64)  # the model's own size; 28 steps, T5 at its 32 tokens
        r = classify(image)
        assert (r.colour, r.background) == want
    # every default came from the model folder (guidance included): the job's first image is what
    # the pipeline draws with no arguments but the prompt and the row's seed
    row = read_manifest(str(out)).to_pylist()[0]
    index = json.loads(open(os.path.join(DEFAULT_MODEL, "model_index.json")).read())
    assert (row["guidance_scale"], row["max_sequence_length"], row["num_inference_steps"]) == (
        folder_guidance_scale(index),
        folder_max_sequence_length(index),
        28,
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL)
    expected = np.asarray(pipe(prompts[0], seed=row["seed"]).images[0], np.int16)
    got = np.asarray(Image.open(out / "images" / "prompt0000_0.png").convert("RGB"), np.int16)
    assert np.abs(got - expected).max() <= 1


def test_generate_with_inference_optimize_draws_the_eager_images(tmp_path, monkeypatch):
    import ray

    from jobs.manifest import read_manifest
    from pipelines import StableDiffusion3Pipeline

    # The replica must see this environment: the job starts its own Ray, not the module's.
    ray.shutdown()
    monkeypatch.setenv("SD3_RAY_PROGRAM_CACHE", str(tmp_path / "programs"))
    prompts = ["a red fox", "a cat"]
    out = tmp_path / "opt"
    args = [a for p in prompts for a in ("--prompt", p)]
    # PPDiffusers' spelling; `--inference-optimize` alone means the same
    assert main(["generate", *args, "--output", str(out), "--inference_optimize", "1", *TINY]) == 0
    eager = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    for row in read_manifest(str(out)).to_pylist():
        i = int(row["id"][len("prompt") :])
        expected = eager(prompts[i], seed=row["seed"], num_inference_steps=1, height=64, width=64).images[0]
        got = Image.open(out / "images" / f"{row['id']}_0.png").convert("RGB")
        assert np.abs(np.asarray(got, np.int16) - np.asarray(expected, np.int16)).max() <= 2
    assert json.loads((out / "job.json").read_text())["config"]["inference_optimize"] is True
    assert [p for p in (tmp_path / "programs").iterdir() if p.is_dir()]  # the replica used the program cache


def test_generate_with_vae_tiling_decodes_in_tiles(tmp_path):
    from jobs.manifest import read_manifest
    from pipelines import StableDiffusion3Pipeline

    out = tmp_path / "tiled"
    size = ["--height", "96", "--width", "96"]  # the fixture VAE's tile is 64 px: 2 x 2 tiles
    assert (
        main(["generate", "--prompt", "a red fox", "--output", str(out), "--vae-tiling", *TINY, *size]) == 0
    )
    row = read_manifest(str(out)).to_pylist()[0]
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    kwargs = dict(seed=row["seed"], num_inference_steps=1, height=96, width=96)
    untiled = np.asarray(pipe("a red fox", **kwargs).images[0], np.int16)
    pipe.vae.enable_tiling()
    tiled = np.asarray(pipe("a red fox", **kwargs).images[0], np.int16)
    got = np.asarray(Image.open(out / "images" / f"{row['id']}_0.png").convert("RGB"), np.int16)
    assert np.abs(got - tiled).max() <= 1
    assert np.abs(got - untiled).max() > 10  # the replica really decoded in tiles
    assert json.loads((out / "job.json").read_text())["config"]["vae_tiling"] is True


def test_generate_vae_tile_tolerance_reaches_the_replicas_vae(tmp_path):
    from jobs.manifest import read_manifest
    from pipelines import StableDiffusion3Pipeline

    out = tmp_path / "first-pass"
    size = ["--height", "96", "--width", "96"]
    args = ["generate", "--prompt", "a red fox", "--output", str(out), "--vae-tiling", *TINY, *size]
    assert main([*args, "--vae-tile-tolerance", "inf"]) == 0
    row = read_manifest(str(out)).to_pylist()[0]
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    pipe.vae.enable_tiling()
    kwargs = dict(seed=row["seed"], num_inference_steps=1, height=96, width=96, output_type="np")
    default = pipe("a red fox", **kwargs).images[0] * 255
    pipe.vae.tile_tolerance = float("inf")  # the first stitched pass
    first_pass = pipe("a red fox", **kwargs).images[0] * 255
    got = np.asarray(Image.open(out / "images" / f"{row['id']}_0.png").convert("RGB"), np.float64)
    assert np.abs(got - first_pass).max() <= 1 and np.abs(first_pass - default).max() > 10
    assert (
        json.loads((out / "job.json").read_text(), parse_constant=None)["config"]["vae_tile_tolerance"]
        == "inf"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vae-tile-tolerance", "0.1"], "--vae-tile-tolerance applies to tiled decoding: add --vae-tiling"),
        (["--vae-tiling", "--vae-tile-tolerance", "-1"], "--vae-tile-tolerance -1.0 must be a number >= 0"),
    ],
)
def test_vae_tile_tolerance_errors_name_the_fix(tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["generate", "--prompt", "a fox", "--output", str(out), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_inference_optimize_flag_errors_name_the_fix(tmp_path, capsys):
    out = str(tmp_path / "o")
    try:
        main(["generate", "--prompt", "a fox", "--output", out, "--inference_optimize", "2", *TINY])
    except SystemExit as e:
        assert e.code == 2
    assert "'2' is not 1 or 0" in capsys.readouterr().err
    assert (
        main(["generate", "--prompt", "a fox", "--output", out, "--inference-optimize", "--mp", "2", *TINY])
        == 2
    )
    assert "--mp 2 shards run eagerly" in capsys.readouterr().err
    assert not os.path.exists(out)


def _parsed(*flags: str) -> dict:
    from jobs.cli import build_parser

    return vars(build_parser().parse_args(["generate", "--prompt", "a fox", "--output", "o", *flags]))


def test_inference_script_spellings_are_aliases():
    for alias, canonical in [
        (["--num-inference-steps", "3"], ["--steps", "3"]),
        (["--num_inference_steps", "3"], ["--steps", "3"]),
        (["--mp_size", "2"], ["--mp", "2"]),
        (["--mp-size", "2"], ["--mp", "2"]),
        (["--dp_size", "2"], ["--cfg-parallel"]),
        (["--dp-size", "2"], ["--cfg-parallel"]),
        (["--dp_size", "1"], []),
        (
            ["--dtype", "bfloat16", "--height", "32", "--width", "48"],
            ["--dtype=bfloat16", "--height=32", "--width=48"],
        ),
    ]:
        assert _parsed(*alias) == _parsed(*canonical), alias
    assert (
        _parsed("--num-inference-steps", "3")["num_inference_steps"] == 3
        and _parsed("--mp_size", "2")["mp"] == 2
    )
    assert _parsed("--dp_size", "2")["cfg_parallel"] is True and _parsed()["cfg_parallel"] is False
    assert _parsed("--benchmark")["benchmark"] is True and _parsed()["benchmark"] is False


def test_dp_size_other_than_1_or_2_is_refused(capsys):
    for value in ("4", "0", "two"):
        try:
            _parsed("--dp_size", value)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"--dp_size {value} was accepted")
        err = capsys.readouterr().err
        assert (
            f"--dp_size/--dp-size: {value!r}: only 1 or 2 (2 = --cfg-parallel" in err and "--replicas" in err
        )


def test_benchmark_prints_and_records_stage_figures(ray_local, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--batch-size", "1"]
    size = ["--height", "32", "--width", "32", "--num-inference-steps", "2"]
    assert main(["generate", *args, "--output", str(out), *size, "--benchmark", "--no-progress"]) == 0
    bench = json.loads((out / "job.json").read_text())["benchmark"]
    assert bench["images"] == 2 and bench["images_per_second"] > 0 and bench["render_seconds"] > 0
    stages = bench["stages"]
    assert set(stages) == {
        "text_encoding_seconds_per_image",
        "denoising_seconds_per_step",
        "denoising_steps",
        "vae_decode_seconds_per_image",
    }
    assert stages["denoising_steps"] == 4  # two calls of two steps, after the warm-up
    assert all(v > 0 for v in stages.values())
    assert bench["peak_rss_bytes"] > 2**20 and list(bench["peak_rss_bytes_per_replica"].values()) == [
        bench["peak_rss_bytes"]
    ]
    err = capsys.readouterr().err
    assert "denoising" in err and "s/step" in err and "images/s" in err and "peak RSS" in err
