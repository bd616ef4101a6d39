"""Hugging Face Hub ids (sd3_core.hub) and the argument spellings of diffusers / PPDiffusers.

The Hub is never contacted: a cache folder is laid out as huggingface_hub lays it out
(``models--org--name/{blobs,refs,snapshots}``, snapshot files symlinked to their blobs) and
``HF_HUB_OFFLINE=1`` is set. huggingface_hub reads its environment once, at import; this process
imported it long before a test runs, so the fixture sets both the variables (for the processes a
test starts: Ray workers) and huggingface_hub's ``constants`` (for this one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from huggingface_hub import constants
from PIL import Image

from jobs.cli import main
from pipelines import StableDiffusion3Pipeline
from sd3_core.dtypes import dtype_argument
from sd3_core.hub import hub_commit, is_hub_id, model_folder
from sd3_core.model_cache import local_model_path, model_identity
from sd3_core.scheduler import FlowMatchEulerDiscreteScheduler
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.vae import AutoencoderKL
from tests.reference_cases import fixture_path

REPO_ID = "org/name"
MAIN = "3" * 40  # the commit refs/main points at
V1 = "1" * 40  # the commit of tag v1: the same model with another scheduler shift
PROMPT = "A cat holding a sign that says hello world"


def add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...]) -> Path:
    """Put the files of `source` in `cache` as huggingface_hub's snapshot_download leaves them."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face cache holding sd3-tiny as org/name (main) and a v1 tag."""
    cache = tmp_path / "hf-cache"
    add_snapshot(cache, REPO_ID, MAIN, Path(fixture_path("sd3-tiny")), ("main",))
    v1 = tmp_path / "v1"
    shutil.copytree(fixture_path("sd3-tiny"), v1)
    config = json.loads((v1 / "scheduler" / "scheduler_config.json").read_text())
    (v1 / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "shift": 1.5}))
    add_snapshot(cache, REPO_ID, V1, v1, ("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "org/name" must not exist as a local path
    return cache


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- the quick start -------------------------------------------------------------------------------


def test_quick_start_runs_verbatim_against_a_hub_id_in_an_offline_cache(hf_cache):
    pipe = StableDiffusion3Pipeline.from_pretrained(
        "org/name", paddle_dtype=paddle.float16
    )  # fmt: skip
    generator = paddle.Generator().manual_seed(42)
    image = pipe("A cat holding a sign that says hello world", generator=generator).images[0]

    assert pipe.transformer.dtype == paddle.float16
    assert isinstance(image, Image.Image) and image.size == (128, 128)  # the model's own size
    # the generator stands for its seed: the same image as seed=42, and again on a second call
    same = pipe(PROMPT, seed=42).images[0]
    again = pipe(PROMPT, generator=generator).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(same))
    assert np.array_equal(np.asarray(image), np.asarray(again))


def test_hub_id_loads_the_snapshot_the_local_folder_holds(hf_cache):
    local = StableDiffusion3Pipeline.from_pretrained(
        fixture_path("sd3-tiny"), text_encoder_3=None, tokenizer_3=None
    )
    hub = StableDiffusion3Pipeline.from_pretrained(REPO_ID, text_encoder_3=None, tokenizer_3=None)
    assert hub.text_encoder_3 is None
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(local, name).state_dict(), getattr(hub, name).state_dict()
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), name


# ---- component classes, revision, subfolder -----------------------------------------------------


def test_component_classes_take_a_hub_id_with_subfolder_and_the_dtype_spellings(hf_cache):
    local = SD3Transformer2DModel.from_pretrained(fixture_path("sd3-tiny"), subfolder="transformer")
    hub = SD3Transformer2DModel.from_pretrained(REPO_ID, subfolder="transformer")
    a, b = local.state_dict(), hub.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    vae = AutoencoderKL.from_pretrained(REPO_ID, subfolder="vae", torch_dtype="torch.float16")
    assert vae.dtype == paddle.float16
    vae = AutoencoderKL.from_pretrained(REPO_ID, subfolder="vae", paddle_dtype=paddle.bfloat16)
    assert vae.dtype == paddle.bfloat16
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(REPO_ID, subfolder="scheduler")
    assert scheduler.config.shift == 3.0


def test_revision_selects_a_cached_branch_tag_or_commit(hf_cache):
    by_tag = FlowMatchEulerDiscreteScheduler.from_pretrained(REPO_ID, subfolder="scheduler", revision="v1")
    by_commit = FlowMatchEulerDiscreteScheduler.from_pretrained(REPO_ID, subfolder="scheduler", revision=V1)
    assert by_tag.config.shift == by_commit.config.shift == 1.5
    pipe = StableDiffusion3Pipeline.from_pretrained(
        REPO_ID, revision="v1", text_encoder_3=None, tokenizer_3=None
    )
    assert pipe.scheduler.config.shift == 1.5
    with pytest.raises(FileNotFoundError) as e:
        SD3Transformer2DModel.from_pretrained(REPO_ID, subfolder="transformer", revision="v2")
    message = str(e.value)
    assert "\n" not in message and "'org/name' at revision 'v2'" in message
    assert str(hf_cache) in message and "cached there: main, v1" in message


def test_a_fresh_process_takes_the_cache_from_hf_home_and_is_offline_by_hf_hub_offline(tmp_path):
    home = tmp_path / "hf-home"
    add_snapshot(home / "hub", REPO_ID, MAIN, Path(fixture_path("sd3-tiny")), ("main",))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    code = "import sys; from sd3_core.hub import model_folder; print(model_folder(sys.argv[1]))"
    found = subprocess.run(
        [sys.executable, "-c", code, REPO_ID],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.stdout.strip() == str(home / "hub" / "models--org--name" / "snapshots" / MAIN), found.stderr
    missing = subprocess.run(
        [sys.executable, "-c", code, "org/missing"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0
    assert f"is not in the Hugging Face cache {home / 'hub'} and HF_HUB_OFFLINE is set" in missing.stderr


def test_local_model_path_resolves_a_hub_id_and_its_identity_names_the_commit(hf_cache):
    path = local_model_path(REPO_ID)
    assert path == str(hf_cache / "models--org--name" / "snapshots" / MAIN)
    assert hub_commit(path) == MAIN and hub_commit(os.path.join(path, "vae")) == MAIN
    assert hub_commit(fixture_path("sd3-tiny")) is None
    assert model_identity(path, REPO_ID) == f"org/name@{MAIN}"


# ---- bad input ----------------------------------------------------------------------------------


def test_a_hub_id_missing_offline_is_one_line_naming_the_id_the_cache_and_how_to_fetch_it(hf_cache):
    before = listing(hf_cache)
    for load in (
        lambda: StableDiffusion3Pipeline.from_pretrained("org/missing", paddle_dtype=paddle.float16),
        lambda: SD3Transformer2DModel.from_pretrained("org/missing", subfolder="transformer"),
        lambda: FlowMatchEulerDiscreteScheduler.from_pretrained("org/missing", subfolder="scheduler"),
        lambda: local_model_path("org/missing"),
    ):
        with pytest.raises(FileNotFoundError) as e:
            load()
        message = str(e.value)
        assert "\n" not in message and e.value.__suppress_context__  # no huggingface_hub traceback
        assert "'org/missing'" in message and str(hf_cache) in message and "HF_HUB_OFFLINE is set" in message
        assert "hf download org/missing" in message
    assert listing(hf_cache) == before  # nothing written


def test_names_that_are_neither_a_folder_nor_a_hub_id_are_refused(hf_cache, tmp_path):
    assert (
        is_hub_id(REPO_ID) and not is_hub_id("a/b/c") and not is_hub_id("org/--x") and not is_hub_id("name")
    )
    with pytest.raises(
        FileNotFoundError, match="'a/b/c': no such local folder, and not a Hugging Face Hub id"
    ):
        StableDiffusion3Pipeline.from_pretrained("a/b/c")
    with pytest.raises(ValueError, match="revision='v1' applies to Hub ids"):
        StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"), revision="v1")
    with pytest.raises(ValueError, match=r"subfolder='\.\./x'"):
        model_folder(REPO_ID, subfolder="../x")
    with pytest.raises(FileNotFoundError, match="has no subfolder 'unet'"):
        SD3Transformer2DModel.from_pretrained(REPO_ID, subfolder="unet")
    os.makedirs("org/name")  # a local folder of that name wins over the Hub id
    assert not is_hub_id(REPO_ID) and model_folder(REPO_ID) == REPO_ID


def test_load_lora_weights_takes_a_hub_id_as_diffusers_does(hf_cache, tmp_path):
    lora_file = Path(fixture_path("training")) / "lora" / "ours_sd3-tiny_r4_alpha6.safetensors"
    repo = tmp_path / "lora-repo"
    (repo / "v2").mkdir(parents=True)
    shutil.copy(lora_file, repo / "sks-dog.safetensors")  # a Hub LoRA's own file name
    shutil.copy(lora_file, repo / "v2" / "pytorch_lora_weights.safetensors")
    (repo / "README.md").write_text("not fetched")
    add_snapshot(hf_cache, "org/sd3-lora", MAIN, repo, ("main",))
    pipe = StableDiffusion3Pipeline.from_pretrained("org/name")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, num_inference_steps=2, seed=3, output_type="np")
    pipe.load_lora_weights(str(lora_file), adapter_name="local")
    expected = pipe(**call).images
    for name, kwargs in [("hub", {}), ("named", {"weight_name": "sks-dog.safetensors"}),
                         ("sub", {"subfolder": "v2", "revision": "main", "local_files_only": True})]:  # fmt: skip
        assert pipe.load_lora_weights("org/sd3-lora", adapter_name=name, **kwargs) == name
        np.testing.assert_array_equal(pipe(**call).images, expected, err_msg=name)
    with pytest.raises(FileNotFoundError, match="'org/no-lora' is not in the Hugging Face cache"):
        pipe.load_lora_weights("org/no-lora")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['hotswap'\]"):
        pipe.load_lora_weights("org/sd3-lora", hotswap=True)


def test_a_lora_folder_with_two_weights_files_asks_for_weight_name(tmp_path):
    from sd3_core.lora import LoRAError

    lora_file = Path(fixture_path("training")) / "lora" / "ours_sd3-tiny_r4_alpha6.safetensors"
    shutil.copy(lora_file, tmp_path / "a.safetensors")
    shutil.copy(lora_file, tmp_path / "optimizer.safetensors")  # a training state: not a candidate
    pipe = StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"))
    assert pipe.load_lora_weights(tmp_path) == "default_0"  # the one weights file
    shutil.copy(lora_file, tmp_path / "b.safetensors")
    with pytest.raises(
        LoRAError, match=r"not one other weights file .*'a.safetensors', 'b.safetensors'.*weight_name="
    ):
        pipe.load_lora_weights(tmp_path)


def test_dtype_spellings_and_conflicts():
    class FakeTorchDtype:  # what a torch dtype looks like by name (torch is not installed here)
        def __str__(self) -> str:
            return "torch.bfloat16"

    FakeTorchDtype.__module__ = "torch"
    assert dtype_argument() == "float32"
    assert dtype_argument(paddle_dtype=paddle.float16) == "float16"
    assert dtype_argument(torch_dtype="torch.float16") == "float16"
    assert dtype_argument(torch_dtype=FakeTorchDtype()) == "bfloat16"
    assert dtype_argument("float16", paddle_dtype="paddle.float16", torch_dtype="float16") == "float16"
    with pytest.raises(ValueError, match="conflicting dtypes dtype='float32', torch_dtype='float16'"):
        dtype_argument("float32", torch_dtype="torch.float16")
    with pytest.raises(ValueError, match="torch_dtype='torch.float64' is not supported"):
        dtype_argument(torch_dtype="torch.float64")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"variant": "fp16"}, ValueError, r"variant= is not supported: .*dtype='float16'"),
        ({"device_map": "auto"}, ValueError, r"device_map= is not supported: .*paddle.set_device"),
        ({"use_safetensors": False}, ValueError, r"use_safetensors=False is not supported"),
        ({"from_diffusers": False}, ValueError, r"from_diffusers=False is not supported"),
        ({"trust_remote_code": True}, ValueError, r"trust_remote_code= is not supported"),
        ({"unet": None}, TypeError, r"unknown argument\(s\) \['unet'\]"),
    ],
)
def test_unsupported_diffusers_options_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        StableDiffusion3Pipeline.from_pretrained(fixture_path("sd3-tiny"), **kwargs)


def test_component_classes_refuse_unknown_keywords():
    with pytest.raises(TypeError, match=r"SD3Transformer2DModel.from_pretrained got unexpected .*\['foo'\]"):
        SD3Transformer2DModel.from_pretrained(fixture_path("sd3-tiny"), subfolder="transformer", foo=1)
    with pytest.raises(ValueError, match="AutoencoderKL.from_pretrained: variant="):
        AutoencoderKL.from_pretrained(fixture_path("sd3-tiny"), subfolder="vae", variant="fp16")


def test_options_that_mean_what_we_do_anyway_are_accepted():
    pipe = StableDiffusion3Pipeline.from_pretrained(
        fixture_path("sd3-tiny"), use_safetensors=True, low_cpu_mem_usage=True, from_hf_hub=True,
        from_diffusers=True, torch_dtype="float32", text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    assert pipe.transformer.dtype == paddle.float32


# ---- generators ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe() -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(
        fixture_path("sd3-tiny"), text_encoder_3=None, tokenizer_3=None
    )


def test_a_paddle_generator_draws_the_latents_of_its_seed(tiny_pipe):
    latents = tiny_pipe.prepare_latents(2, 64, 64, generator=paddle.Generator().manual_seed(42))
    assert np.array_equal(latents.numpy(), tiny_pipe.prepare_latents(2, 64, 64, seed=42).numpy())
    # one generator per image (distinct objects) = one seed per image
    generators = [paddle.base.core.Generator().manual_seed(s) for s in (7, 8, 9)]
    per_image = tiny_pipe.prepare_latents(3, 64, 64, generator=generators).numpy()
    assert np.array_equal(per_image, tiny_pipe.prepare_latents(3, 64, 64, seed=[7, 8, 9]).numpy())
    assert not np.array_equal(per_image[0], per_image[1])


def test_a_torch_generator_is_taken_by_its_seed_too(tiny_pipe):
    class FakeTorchGenerator:  # what torch.Generator looks like by class (torch is not installed here)
        def initial_seed(self) -> int:
            return 42

    FakeTorchGenerator.__module__, FakeTorchGenerator.__name__ = "torch._C", "Generator"
    latents = tiny_pipe.prepare_latents(1, 64, 64, generator=FakeTorchGenerator())
    assert np.array_equal(latents.numpy(), tiny_pipe.prepare_latents(1, 64, 64, seed=42).numpy())


def test_unusable_generators_are_refused_naming_generator(tiny_pipe):
    # paddle.Generator() is the device's one default generator: a list of it is one object seeded last
    with pytest.raises(ValueError, match=r"same Generator object more than once.*seed=\[\.\.\.\]"):
        tiny_pipe.prepare_latents(2, 64, 64, generator=[paddle.Generator().manual_seed(i) for i in range(2)])
    with pytest.raises(
        TypeError, match=r"`generator` must be an int >= 0, a numpy.random.Generator or a paddle"
    ):
        tiny_pipe.prepare_latents(1, 64, 64, generator="42")
    with pytest.raises(TypeError, match=r"`generator\[1\]` must be"):
        tiny_pipe.prepare_latents(2, 64, 64, generator=[1, 2.5])
    with pytest.raises(TypeError, match=r"`seed` must be an int >= 0"):
        tiny_pipe.prepare_latents(1, 64, 64, seed=-1)


# ---- the command line ---------------------------------------------------------------------------


def test_submit_does_not_call_a_hub_id_a_relative_path(tmp_path, monkeypatch):
    from argparse import Namespace

    from jobs.submit import relative_path_warnings

    monkeypatch.chdir(tmp_path)
    notes = relative_path_warnings(Namespace(command="generate", model="org/name", output="out/run"))
    assert len(notes) == 1 and "--output out/run is a relative path" in notes[0]


def test_sd3_generate_takes_a_hub_id_and_names_a_missing_one(hf_cache, tmp_path, capsys):
    from jobs.manifest import read_manifest

    out = tmp_path / "out"
    tiny = ["--steps", "1", "--height", "64", "--width", "64", "--no-progress"]
    assert main(["generate", "--model", "org/name", "--prompt", PROMPT, "--output", str(out), *tiny]) == 0
    assert (out / "images" / "prompt0000_0.png").is_file()
    assert read_manifest(str(out)).column("model").to_pylist() == [f"org/name@{MAIN}"]
    capsys.readouterr()

    missing = tmp_path / "missing"
    assert (
        main(["generate", "--model", "org/missing", "--prompt", PROMPT, "--output", str(missing), *tiny]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(
        "sd3 generate: error: --model org/missing: Hub model 'org/missing'"
    )
    assert str(hf_cache) in err and "hf download org/missing" in err
    assert not missing.exists()  # nothing written


def test_sd3_train_takes_a_hub_id_and_names_a_missing_one(hf_cache, tmp_path, capsys):
    from tests.test_train import make_images

    images = make_images(tmp_path / "dog")
    argv = ["train", "dreambooth-lora", f"--instance_data_dir={images}", "--instance_prompt", "a photo of sks dog",
            "--resolution=32", "--train_batch_size=2", "--max_train_steps=1", "--max_sequence_length=16",
            "--report_to=none", "--device=cpu", "--local"]  # fmt: skip
    out = tmp_path / "lora"
    assert main([*argv, "--pretrained_model_name_or_path=org/name", f"--output_dir={out}"]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()

    missing = tmp_path / "missing"
    assert main([*argv, "--pretrained_model_name_or_path=org/missing", f"--output_dir={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sd3 train: error: Hub model 'org/missing' is not in the")
    assert not missing.exists()  # nothing written
