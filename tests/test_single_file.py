"""Original-layout single files: diffusers parity, key/config reading, converter round trips, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import paddle
import pytest

from jobs import cli
from pipelines import StableDiffusion3Pipeline
from sd3_core import single_file
from sd3_core.safetensors_io import SafetensorsFile, WeightsFileError, open_weights, write_safetensors
from sd3_core.single_file import SingleFileError
from sd3_core.single_file_convert import write_single_file
from sd3_core.single_file_keys import transformer_refs, vae_original_refs
from sd3_core.t5_encoder import load_t5_encoder
from sd3_core.torch_state import WeightLoadError
from sd3_core.transformer import SD3Transformer2DModel
from sd3_core.vae import AutoencoderKL
from tests.reference_cases import FIXTURES, arrays, cases, fixture_path
from tests.s3_server import make_bucket, s3_client

SINGLE = Path(FIXTURES) / "single-file"
MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _assert_same_state(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def _folder_tensors(folder: Path, name: str) -> dict[str, dict[str, np.ndarray]]:
    weights = (
        "model.safetensors" if name.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    )
    index = open_weights(folder / name, weights)
    return {k: np.array(index.get(k)) for k in index}


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of the single file `src` with its tensors passed through `edit` (and no metadata)."""
    with SafetensorsFile(src) as f:
        tensors = edit({k: np.array(f.get(k)) for k in f.keys()})
    write_safetensors(dst, tensors)
    return dst


# ---- parity with diffusers' from_single_file ---------------------------------------------------


@pytest.mark.parametrize("case", cases("single_file"), ids=lambda c: c["name"])
def test_matches_diffusers_from_single_file(case):
    args, ref = case["args"], arrays(case)
    file = Path(FIXTURES) / args["file"]
    if args["component"] == "pipeline":  # text encoders from the file (T5 in fp8), tokenizers from config=
        pipe = StableDiffusion3Pipeline.from_single_file(file, config=fixture_path(args["config"]))
        embeds, _, pooled, _ = pipe.encode_prompt(
            args["prompt"], max_sequence_length=args["max_sequence_length"], do_classifier_free_guidance=False
        )
        clip_l = pipe.text_encoder.config["projection_dim"]
        np.testing.assert_allclose(embeds.numpy(), ref["out_prompt_embeds"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(pooled.numpy()[:, clip_l:], ref["out_pooled_clip_g"], rtol=0, atol=1e-4)
        return
    if args["component"] == "transformer":
        model = SD3Transformer2DModel.from_single_file(file)  # config from the keys (and metadata)
        names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
        out = model(*[paddle.to_tensor(ref[f"in_{n}"]) for n in names]).sample
    else:
        out = AutoencoderKL.from_single_file(file).decode(paddle.to_tensor(ref["in_z"])).sample
    assert list(out.shape) == list(ref["out_sample"].shape)
    np.testing.assert_allclose(out.numpy(), ref["out_sample"], rtol=0, atol=2e-5)


def test_clip_l_without_projection_gets_the_identity(tmp_path):
    # Stability's CLIP-L carries no text_projection; diffusers and ComfyUI use the identity.
    key = "text_encoders.clip_l.transformer.text_projection.weight"
    file = _rewrite(SINGLE / "sd3-tiny.safetensors", tmp_path / "noproj.safetensors",
                    lambda t: {k: v for k, v in t.items() if k != key})  # fmt: skip
    pipe = StableDiffusion3Pipeline.from_single_file(file, config=fixture_path("sd3-tiny"))
    np.testing.assert_array_equal(
        pipe.text_encoder.text_projection.weight.numpy(), np.eye(32, dtype=np.float32)
    )


@pytest.mark.parametrize("fixture", ["sd3-tiny", "sd35-tiny"])
def test_single_file_loads_the_folders_tensors_and_config(fixture):
    file = SINGLE / f"{fixture}.safetensors"
    for cls, sub in ((SD3Transformer2DModel, "transformer"), (AutoencoderKL, "vae")):
        ours, folder = cls.from_single_file(file), cls.from_pretrained(fixture_path(fixture), subfolder=sub)
        assert dict(ours.config) == dict(folder.config)
        _assert_same_state(ours, folder)


def test_float8_decoding_matches_torch():
    for case in cases("float8"):
        ref = arrays(case)
        dtype = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}[
            case["args"]["dtype"]
        ]
        ours = ref["in_bytes"].astype(np.uint8).view(dtype).astype(np.float32)
        theirs = ref["out_float32_bits"].astype(np.uint32).view(np.float32)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        keep = ~np.isnan(theirs)
        np.testing.assert_array_equal(ours[keep].view(np.uint32), theirs[keep].view(np.uint32))


# ---- config from keys --------------------------------------------------------------------------


def test_config_comes_from_the_keys_without_metadata(tmp_path):
    # SD3.5: the head width is the qk-norm width, so the keys alone give the whole config.
    bare = _rewrite(SINGLE / "sd35-tiny.safetensors", tmp_path / "sd35.safetensors", lambda t: t)
    config = dict(SD3Transformer2DModel.from_single_file(bare).config)
    folder = dict(SD3Transformer2DModel.from_pretrained(fixture_path("sd35-tiny"), "transformer").config)
    assert config.pop("sample_size") == 128  # no key records it: SD3's (1024 px)
    assert config == {k: v for k, v in folder.items() if k != "sample_size"}
    # SD3 has no qk-norm: a 32-wide model cannot have SD3's 64-wide heads; config= supplies the width.
    bare = _rewrite(SINGLE / "sd3-tiny.safetensors", tmp_path / "sd3.safetensors", lambda t: t)
    with pytest.raises(SingleFileError, match="attention_head_dim.*pass config="):
        SD3Transformer2DModel.from_single_file(bare)
    for config, subfolder in ((fixture_path("sd3-tiny"), None), (fixture_path("sd3-tiny"), "transformer"),
                              (os.path.join(fixture_path("sd3-tiny"), "transformer"), None)):  # fmt: skip
        model = SD3Transformer2DModel.from_single_file(bare, config=config, subfolder=subfolder)
        assert model.config.num_attention_heads == 2 and model.config.attention_head_dim == 16
    vae = AutoencoderKL.from_single_file(bare, config=fixture_path("sd3-tiny"))
    assert vae.config.norm_num_groups == 4


def test_unprefixed_mmdit_file(tmp_path):
    # Some files keep the MM-DiT alone with bare keys (joint_blocks.N..., as diffusers also accepts).
    bare = _rewrite(SINGLE / "sd35-tiny.safetensors", tmp_path / "bare.safetensors",
                    lambda t: {k.removeprefix("model.diffusion_model."): v for k, v in t.items()
                               if k.startswith("model.diffusion_model.")})  # fmt: skip
    folder = SD3Transformer2DModel.from_pretrained(fixture_path("sd35-tiny"), "transformer")
    _assert_same_state(SD3Transformer2DModel.from_single_file(bare), folder)
    with pytest.raises(SingleFileError, match="holds no vae"):
        AutoencoderKL.from_single_file(bare)


PUBLISHED = {  # sd3-reference.md section 2 (diffusers configs of the published models)
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192, qk_norm=None, dual_attention_layers=[]),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=list(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=[]),
}  # fmt: skip


class _ShapesOnly:
    """The header of a single file (names and shapes, no data), enough to read a config from."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes, self.metadata, self.path = shapes, {}, Path("published.safetensors")

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_variants_get_their_published_config(name):
    with paddle.LazyGuard():  # shapes only, no memory
        config = {**dict(SD3Transformer2DModel().config), **PUBLISHED[name]}  # the diffusers defaults + these
        state = SD3Transformer2DModel(**config).state_dict()
    shapes: dict[str, tuple[int, ...]] = {}
    for key, ref in transformer_refs(config).items():
        shape = tuple(state[key].shape)
        shape = shape[::-1] if len(shape) == 2 else shape  # every 2-D tensor here is a Linear weight
        prev = shapes.get("model.diffusion_model." + ref.key, (0,))
        shapes["model.diffusion_model." + ref.key] = (
            (prev[0] + shape[0], *shape[1:]) if ref.parts > 1 else shape
        )
    ckpt = single_file.Checkpoint(_ShapesOnly(shapes), name)
    assert ckpt.transformer_config() == config


def test_published_vae_gets_its_published_config():
    published = {  # sd3-reference.md section 2 (the SD3 / SD3.5 vae/config.json)
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2, "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32,
        "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609, "latents_mean": None,
        "latents_std": None, "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }  # fmt: skip
    with paddle.LazyGuard():
        state = AutoencoderKL(**published).state_dict()
    refs = vae_original_refs(list(state), levels=4)
    shapes = {}
    for key, ref in refs.items():
        shape = tuple(state[key].shape)
        # 2-D tensors are the attention Linear weights, stored as 1x1 convolutions.
        shapes["first_stage_model." + ref.key] = (*shape[::-1], 1, 1) if len(shape) == 2 else shape
    assert all(len(s) == 4 for k, s in shapes.items() if ".attn_1.q.weight" in k)
    ckpt = single_file.Checkpoint(_ShapesOnly(shapes), "sd3_medium.safetensors")
    assert ckpt.vae_config() == published


# ---- pipelines -----------------------------------------------------------------------------------


def test_pipeline_from_single_file_with_config_matches_diffusers():
    # The sd35-tiny file holds transformer + VAE (like sd3.5_large.safetensors); the rest from config=.
    case = next(c for c in cases("pipeline") if c["name"] == "pipeline_sd35_h96w64_nocfg")
    args, ref = dict(case["args"]), arrays(case)
    for key in ("drop_t5", "note"):
        args.pop(key)
    pipe = StableDiffusion3Pipeline.from_single_file(
        SINGLE / "sd35-tiny.safetensors", config=fixture_path("sd35-tiny")
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(**args, latents=ref["in_latents"], output_type="np").images
    np.testing.assert_allclose(images, ref["out_images"], rtol=0, atol=2e-3)


def _tokenizers_only_config(tmp_path: Path, fixture: str) -> Path:
    """A config folder holding no models: tokenizers, scheduler and model_index.json only."""
    src, out = Path(fixture_path(fixture)), tmp_path / f"{fixture}-config"
    out.mkdir()
    (out / "model_index.json").write_text((src / "model_index.json").read_text())
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        if (src / name).is_dir():
            os.symlink(src / name, out / name)
    return out


@pytest.mark.parametrize("fixture", ["sd3-tiny", "sd35-tiny"])
def test_text_encoders_inside_the_file_and_round_trip(tmp_path, fixture):
    file, back = tmp_path / "all.safetensors", tmp_path / "back"
    assert (
        cli.main(
            ["convert", "--to", "single-file", fixture_path(fixture), str(file), "--include-text-encoders"]
        )
        == 0
    )
    with SafetensorsFile(file) as f:
        assert "text_encoders.t5xxl.transformer.shared.weight" in f
        assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in f
    # Every model comes from the file: the config folder has none.
    pipe = StableDiffusion3Pipeline.from_single_file(
        f"file://{file}", config=_tokenizers_only_config(tmp_path, fixture)
    )
    folder = StableDiffusion3Pipeline.from_pretrained(fixture_path(fixture))
    for name in MODELS:
        _assert_same_state(getattr(pipe, name), getattr(folder, name))
    # single file -> diffusers folder: the very tensors of the original folder.
    assert (
        cli.main(["convert", "--to", "diffusers", str(file), str(back), "--config", fixture_path(fixture)])
        == 0
    )
    for name in MODELS:
        assert _folder_tensors(back, name).keys() == _folder_tensors(Path(fixture_path(fixture)), name).keys()
        for k, v in _folder_tensors(back, name).items():
            np.testing.assert_array_equal(v, _folder_tensors(Path(fixture_path(fixture)), name)[k], err_msg=k)
    reloaded = StableDiffusion3Pipeline.from_pretrained(back)
    _assert_same_state(reloaded.transformer, folder.transformer)
    assert json.loads((back / "model_index.json").read_text())["tokenizer_3"][0] == "transformers"


def test_convert_to_diffusers_without_config_writes_the_models_and_a_default_scheduler(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["convert", "--to", "diffusers", str(SINGLE / "sd35-tiny.safetensors"), str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"] and index["tokenizer"] == [
        None,
        None,
    ]
    for cls, sub in ((SD3Transformer2DModel, "transformer"), (AutoencoderKL, "vae")):
        _assert_same_state(cls.from_pretrained(out, sub), cls.from_pretrained(fixture_path("sd35-tiny"), sub))
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["num_train_timesteps"], scheduler["shift"]) == (1000, 3.0)
    with pytest.raises(ValueError, match="has no `text_encoder` component"):
        StableDiffusion3Pipeline.from_pretrained(out)


def test_fp8_t5_is_upcast_to_torchs_values(tmp_path):
    file = tmp_path / "fp8.safetensors"
    write_single_file(fixture_path("sd3-tiny"), file, include_text_encoders=True, t5_fp8=True)
    e4m3 = next(c for c in cases("float8") if c["args"]["dtype"] == "float8_e4m3fn")
    table = arrays(e4m3)["out_float32_bits"].astype(np.uint32).view(np.float32)  # torch's decoding
    key = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    with SafetensorsFile(file) as f:
        assert f.dtype(key) == ml_dtypes.float8_e4m3fn
        expected = table[np.array(f.get(key)).view(np.uint8)]
    pipe = StableDiffusion3Pipeline.from_single_file(
        file, config=_tokenizers_only_config(tmp_path, "sd3-tiny")
    )
    q = pipe.text_encoder_3.model.encoder.block[0].layer[0].SelfAttention.q.weight
    assert q.dtype == paddle.float32
    np.testing.assert_array_equal(q.numpy().T, expected)
    # The fp8 values are close to the float32 originals (e4m3: 3 mantissa bits).
    original = load_t5_encoder(os.path.join(fixture_path("sd3-tiny"), "text_encoder_3"))
    want = original.model.encoder.block[0].layer[0].SelfAttention.q.weight.numpy()
    np.testing.assert_allclose(q.numpy(), want, rtol=0.07, atol=1e-3)


def test_s3_url(s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="m/sd35.safetensors",
                                      Body=(SINGLE / "sd35-tiny.safetensors").read_bytes())  # fmt: skip
    model = SD3Transformer2DModel.from_single_file(f"s3://{bucket}/m/sd35.safetensors")
    _assert_same_state(model, SD3Transformer2DModel.from_pretrained(fixture_path("sd35-tiny"), "transformer"))
    with pytest.raises(WeightsFileError, match=f"s3://{bucket}/nothing.safetensors: weights file not found"):
        SD3Transformer2DModel.from_single_file(f"s3://{bucket}/nothing.safetensors")


# ---- bad input -----------------------------------------------------------------------------------


def _file_of_keys(path: Path, keys: list[str]) -> Path:
    write_safetensors(path, {k: np.zeros((2, 2), np.float32) for k in keys})
    return path


OTHER_MODELS = {
    "sdxl": (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x",
              "first_stage_model.decoder.conv_in.weight"], "SDXL UNet"),
    "sd15": (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"],
             "Stable Diffusion 1.x/2.x UNet"),
    "flux": (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux transformer"),
    "diffusers": (["transformer_blocks.0.attn.to_q.weight"], "diffusers-format transformer"),
}  # fmt: skip


@pytest.mark.parametrize("kind", OTHER_MODELS)
def test_a_file_of_another_model_is_named(tmp_path, kind):
    keys, looks_like = OTHER_MODELS[kind]
    file = _file_of_keys(tmp_path / f"{kind}.safetensors", keys)
    for load in (SD3Transformer2DModel.from_single_file, StableDiffusion3Pipeline.from_single_file):
        with pytest.raises(
            SingleFileError, match=f"not an SD3 / SD3.5 checkpoint: it looks like .*{looks_like}.*supported"
        ):
            load(file)
    out = tmp_path / "out"
    assert cli.main(["convert", "--to", "diffusers", str(file), str(out)]) == 2
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [file.name]


def test_a_truncated_file_is_named_and_nothing_is_written(tmp_path, capsys):
    data = (SINGLE / "sd3-tiny.safetensors").read_bytes()
    file = tmp_path / "cut.safetensors"
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match=f"{file}: truncated file"):
        SD3Transformer2DModel.from_single_file(file)
    with pytest.raises(WeightsFileError, match=f"{file}: truncated file"):
        StableDiffusion3Pipeline.from_single_file(file, config=fixture_path("sd3-tiny"))
    out = tmp_path / "out"
    assert (
        cli.main(["convert", "--to", "diffusers", str(file), str(out), "--config", fixture_path("sd3-tiny")])
        == 2
    )
    assert "truncated file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors"]


def test_pipeline_without_config_says_to_pass_one():
    with pytest.raises(SingleFileError, match="holds no text_encoder and no config= was given; pass config="):
        StableDiffusion3Pipeline.from_single_file(SINGLE / "sd35-tiny.safetensors")
    with pytest.raises(SingleFileError, match="holds no tokenizer and no config= was given; pass config="):
        StableDiffusion3Pipeline.from_single_file(SINGLE / "sd3-tiny.safetensors")  # text encoders inside
    with pytest.raises(FileNotFoundError, match="not a diffusers SD3 pipeline folder"):
        StableDiffusion3Pipeline.from_single_file(SINGLE / "sd3-tiny.safetensors", config=FIXTURES)
    with pytest.raises(TypeError, match="unknown component"):
        StableDiffusion3Pipeline.from_single_file(SINGLE / "sd3-tiny.safetensors", unet=None)


def test_text_encoders_without_any_config_are_refused(tmp_path):
    file = tmp_path / "all.safetensors"
    write_single_file(fixture_path("sd35-tiny"), file, include_text_encoders=True)
    bare = _rewrite(file, tmp_path / "bare.safetensors", lambda t: t)  # no metadata
    with pytest.raises(SingleFileError, match=r"holds text_encoder .*but no config for it; pass config="):
        StableDiffusion3Pipeline.from_single_file(bare, transformer=None, vae=None)
    with pytest.raises(SingleFileError, match=r"norm_num_groups=32; pass config="):
        StableDiffusion3Pipeline.from_single_file(bare, transformer=None)


def test_unknown_and_missing_transformer_tensors_are_named(tmp_path):
    extra = _rewrite(SINGLE / "sd35-tiny.safetensors", tmp_path / "extra.safetensors",
                     lambda t: {**t, "model.diffusion_model.joint_blocks.0.x_block.attn.mystery": np.zeros(2, np.float32)})  # fmt: skip
    with pytest.raises(
        WeightLoadError, match="no place for: model.diffusion_model.joint_blocks.0.x_block.attn.mystery"
    ):
        SD3Transformer2DModel.from_single_file(extra)
    gone = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"
    missing = _rewrite(SINGLE / "sd35-tiny.safetensors", tmp_path / "missing.safetensors",
                       lambda t: {k: v for k, v in t.items() if k != gone})  # fmt: skip
    with pytest.raises(WeightLoadError, match=r"missing keys \(1\): transformer_blocks.1.ff.net.2.weight"):
        SD3Transformer2DModel.from_single_file(missing)


def test_bad_paths_and_arguments(tmp_path, capsys):
    with pytest.raises(SingleFileError, match="is a folder; from_single_file takes one .safetensors file"):
        SD3Transformer2DModel.from_single_file(fixture_path("sd3-tiny"))
    with pytest.raises(WeightsFileError, match="weights file not found"):
        SD3Transformer2DModel.from_single_file(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="config="):
        SD3Transformer2DModel.from_single_file(SINGLE / "sd3-tiny.safetensors", config=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        SD3Transformer2DModel.from_single_file(
            SINGLE / "sd3-tiny.safetensors", config=FIXTURES, subfolder="nope"
        )
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        SD3Transformer2DModel.from_single_file(SINGLE / "sd3-tiny.safetensors", dtype="int8")
    with SafetensorsFile(SINGLE / "sd3-tiny.safetensors") as f:
        write_safetensors(tmp_path / "meta.safetensors", {k: np.array(f.get(k)) for k in f.keys()},
                          {"sd3_ray.config.transformer": "{not json"})  # fmt: skip
    with pytest.raises(SingleFileError, match="metadata sd3_ray.config.transformer is not JSON"):
        SD3Transformer2DModel.from_single_file(tmp_path / "meta.safetensors")
    vae_only = _rewrite(SINGLE / "sd3-tiny.safetensors", tmp_path / "vae.safetensors",
                        lambda t: {k: v for k, v in t.items() if k.startswith("first_stage_model.")})  # fmt: skip
    with pytest.raises(SingleFileError, match="holds no transformer"):
        SD3Transformer2DModel.from_single_file(vae_only)
    assert (
        AutoencoderKL.from_single_file(vae_only, config=fixture_path("sd3-tiny")).config.latent_channels == 16
    )
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep")
    for argv, message in (
        (["--to", "single-file", fixture_path("sd3-tiny"), str(out)], "refusing to overwrite"),
        (["--to", "single-file", fixture_path("sd3-tiny"), str(tmp_path / "y"), "--t5-fp8"], "needs include_text_encoders"),
        (["--to", "single-file", fixture_path("sd3-tiny"), str(tmp_path / "y"), "--config", "c"], "--to diffusers only"),
        (["--to", "diffusers", str(SINGLE / "sd3-tiny.safetensors"), str(tmp_path / "y"), "--t5-fp8"], "single-file only"),
        (["--to", "single-file", str(tmp_path), str(tmp_path / "y")], "not a diffusers pipeline folder"),
        (["--to", "diffusers", str(SINGLE / "sd3-tiny.safetensors"), str(tmp_path / "y"), "--config", str(tmp_path)],
         "model_index.json: not found"),
    ):  # fmt: skip
        assert cli.main(["convert", *argv]) == 2
        assert message in capsys.readouterr().err
    assert out.read_bytes() == b"keep" and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_from_single_file_takes_the_dtype_spellings_of_both_ecosystems():
    import paddle

    file = SINGLE / "sd35-tiny.safetensors"
    pipe = StableDiffusion3Pipeline.from_single_file(
        file, config=fixture_path("sd35-tiny"), paddle_dtype=paddle.bfloat16
    )
    assert pipe.transformer.dtype == paddle.bfloat16
    pipe = StableDiffusion3Pipeline.from_single_file(
        file, config=fixture_path("sd35-tiny"), torch_dtype="torch.float16"
    )
    assert pipe.transformer.dtype == paddle.float16
    with pytest.raises(ValueError, match="paddle_dtype"):
        StableDiffusion3Pipeline.from_single_file(file, config=fixture_path("sd35-tiny"), dtype="float32",
                                                  paddle_dtype=paddle.float16)  # fmt: skip
