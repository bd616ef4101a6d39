"""The default model's recipe (tools/default_model): shapes data, the classifier, VAE training,
the pipeline folder the transformer is trained in, and the adherence evaluation; then the shipped
model (jobs/default_model) itself: its prompt adherence, and a DreamBooth-LoRA run that teaches it
a colour it never saw."""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tools.default_model import shapes_data
from tools.default_model.shape_classifier import accuracy, classify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECT = "orange"  # shapes_data.NEW_COLOURS: captioned "sks", never in the training data


def test_shapes_are_deterministic_from_the_seed_and_captioned():
    a, b = shapes_data.generate(6, seed=3), shapes_data.generate(6, seed=3)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(a, b, strict=True))
    assert [s for s, _ in shapes_data.generate(6, seed=4)] != [s for s, _ in a]
    spec, image = a[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert spec.caption == f"a {spec.colour} {spec.shape} on a {spec.background} background"
    captions = shapes_data.all_captions()
    assert len(captions) == 24 and len({c for c, *_ in captions}) == 24
    assert ("a red circle on a black background", "circle", "red", "black") in captions


def test_the_training_data_is_pinned():
    # the shipped model was trained on generate(8192, seed=0): these are its first 8 samples
    samples = shapes_data.generate(8, seed=0)
    assert [s.caption for s, _ in samples][:3] == [
        "a red circle on a white background",
        "a yellow circle on a black background",
        "a red triangle on a white background",
    ]
    pixels = b"".join(np.asarray(image).tobytes() for _, image in samples)
    assert (
        hashlib.sha256(pixels).hexdigest()
        == "572d12da5a08e3dfee896a4833f02dae8f36ed6b0361f17ee7f5c5d59b11b90a"
    )


def test_the_new_subject_is_an_orange_shape_captioned_sks(tmp_path):
    path = str(tmp_path / "sks.parquet")
    shapes_data.write_parquet(path, 12, seed=1, colours=(SUBJECT,))
    table = pq.read_table(path).to_pylist()
    assert {r["colour"] for r in table} == {SUBJECT}
    assert all(r["caption"] == f"a sks {r['shape']} on a {r['background']} background" for r in table)
    images, _ = shapes_data.load_images(path)
    assert all(classify(image, tuple(shapes_data.PALETTE)).colour == SUBJECT for image in images)
    assert len(shapes_data.all_captions((SUBJECT,))) == 6
    with pytest.raises(ValueError, match="magenta"):
        shapes_data.generate(1, seed=0, colours=("magenta",))


def test_classifier_reads_the_new_colour_only_when_asked():
    assert accuracy(300, seed=2025, colours=(SUBJECT,)) == {
        "colour": 1.0, "background": 1.0, "shape": 1.0, "shape_lenient": 1.0
    }  # fmt: skip
    # with the default (training) palette an orange shape is read as its nearest colour
    assert {classify(image).colour for _, image in shapes_data.generate(40, 7, (SUBJECT,))} <= {
        "red",
        "yellow",
    }


def test_table_is_what_the_training_job_reads(tmp_path):
    from pipelines.training.data import read_parquet_table

    path = str(tmp_path / "shapes.parquet")
    shapes_data.write_parquet(path, 10, seed=0)
    items = read_parquet_table(path, "image", "caption")
    specs = [s for s, _ in shapes_data.generate(10, seed=0)]
    assert [p for _, p, _ in items] == [s.caption for s in specs]
    assert np.array_equal(np.asarray(items[0][0]), np.asarray(shapes_data.render(specs[0])))
    images, captions = shapes_data.load_images(path)
    assert images.shape == (10, 64, 64, 3) and captions == [s.caption for s in specs]


def test_classifier_reads_fresh_generator_samples():
    # samples the training data never saw (another seed); the strict shape test is what counts
    acc = accuracy(400, seed=2024)
    assert min(acc.values()) >= 0.98, acc


def test_classifier_tolerates_the_blur_of_a_decoder():
    from PIL import ImageFilter

    samples = shapes_data.generate(200, seed=99)
    readings = [classify(image.filter(ImageFilter.GaussianBlur(1.0))) for _, image in samples]
    hits = sum(
        r.shape == s.shape and r.colour == s.colour for (s, _), r in zip(samples, readings, strict=True)
    )
    assert hits / len(samples) >= 0.97


def test_classifier_refuses_what_is_not_a_clean_shape():
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert classify(blank).shape == "none" and classify(blank).background == "white"
    bar = np.zeros((64, 64, 3), np.uint8)
    bar[28:36, 8:56] = (220, 30, 30)  # a red bar: right colour, no shape of ours
    r = classify(bar)
    assert (r.colour, r.background, r.shape) == ("red", "black", "none")
    noisy = np.asarray(
        shapes_data.render(shapes_data.ShapeSpec("square", "blue", "white", 32, 32, 30))
    ).copy()
    noisy[2:4, 2:4] = 0  # a speck does not move the bounding box
    assert classify(Image.fromarray(noisy)).shape == "square"


def test_vae_training_writes_a_folder_with_factors_from_its_latents(tmp_path):
    import paddle

    from sd3_core.vae import AutoencoderKL
    from tools.default_model import train_vae

    data = str(tmp_path / "shapes.parquet")
    shapes_data.write_parquet(data, 8, seed=0)
    info = train_vae.train(
        data, str(tmp_path / "vae"), steps=2, batch_size=4, log_every=1, save_every=100, check_count=4
    )
    assert info["completed_steps"] == 2 and len(info["history"]) == 2
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert vae.scale_factor == 8 and vae.config.latent_channels == 16
    assert vae.config.shift_factor == pytest.approx(info["shift_factor"], abs=1e-6)
    # SD3's recipe: the scaled latents have mean 0 and std 1 over the data
    pixels = train_vae.to_pixels(shapes_data.load_images(data)[0])
    with paddle.no_grad():
        z = (
            vae.encode(paddle.to_tensor(pixels))
            .latent_dist.sample(generator=np.random.default_rng([0, 99]))
            .numpy()
        )
    scaled = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(scaled.mean()) < 1e-4 and scaled.std() == pytest.approx(1.0, abs=1e-4)
    # a second stage starts from the trained weights
    again = train_vae.train(
        data, str(tmp_path / "vae2"), steps=1, batch_size=4, lr=0.0, init=str(tmp_path / "vae"), check_count=4
    )
    assert again["init"] == str(tmp_path / "vae")
    assert again["shift_factor"] == pytest.approx(info["shift_factor"], abs=1e-5)  # lr 0: same weights
    # a third stage trains the decoder alone: the encoder, the latents and the factors stay
    third = train_vae.train(data, str(tmp_path / "vae3"), steps=2, batch_size=4, lr=1e-2, init=str(tmp_path / "vae"),
                            check_count=4, decoder_only=True, edge_weight=4.0)  # fmt: skip
    before, after = vae.state_dict(), AutoencoderKL.from_pretrained(tmp_path / "vae3").state_dict()
    changed = {k for k in before if not np.array_equal(before[k].numpy(), after[k].numpy())}
    assert changed and all(k.startswith("decoder.") for k in changed), sorted(changed)[:5]
    assert (third["shift_factor"], third["scaling_factor"]) == (info["shift_factor"], info["scaling_factor"])
    assert third["decoder_only"] and third["edge_weight"] == 4.0
    with pytest.raises(ValueError, match="decoder_only: needs init"):
        train_vae.train(data, str(tmp_path / "vae4"), steps=1, decoder_only=True)


def test_edge_weights_mark_a_pixel_either_side_of_an_edge():
    import paddle

    from tools.default_model.train_vae import edge_weights

    image = np.full((1, 3, 16, 16), -1.0, np.float32)
    image[:, 0, 4:12, 4:12] = 1.0  # a red square on black: edges at rows/columns 3-4 and 11-12
    w = edge_weights(paddle.to_tensor(image), 4.0).numpy()[0, 0]
    assert w.shape == (16, 16) and set(np.unique(w)) == {1.0, 5.0}
    assert w[8, 8] == 1.0 and w[0, 0] == 1.0  # flat inside and outside
    assert w[4, 8] == w[11, 8] == w[8, 3] == w[8, 12] == 5.0  # on the border, either side


def test_assembled_folder_loads_with_t5_length_32_and_the_training_command(tmp_path):
    from pipelines import StableDiffusion3Pipeline
    from tools.default_model import train_model, train_vae

    train_vae.build_vae(0).save_pretrained(tmp_path / "vae")
    train_model.assemble(str(tmp_path / "vae"), str(tmp_path / "base"), seed=0)
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    assert index["_max_sequence_length"] == 32 and index["_guidance_scale"] == train_model.GUIDANCE_SCALE
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "base")
    assert (
        pipe.default_max_sequence_length == 32 and pipe.default_guidance_scale == train_model.GUIDANCE_SCALE
    )
    assert pipe.transformer.config.patch_size == 1  # 64 image tokens for a 64x64 image
    params = sum(int(np.prod(p.shape)) for p in pipe.transformer.parameters())
    assert 3.0e6 < params < 4.0e6
    out = pipe("a red circle on a black background", height=64, width=64, num_inference_steps=2, seed=0)
    assert out.images[0].size == (64, 64)
    command = train_model.train_args(str(tmp_path / "base"), "d.parquet", "run", 10, 0, 16, 1e-3, 5)
    from jobs.cli import build_parser
    from jobs.train_cli import config_from_args

    cfg = config_from_args(build_parser().parse_args(command))
    assert (cfg.mode, cfg.caption_dropout, cfg.max_sequence_length, cfg.weighting_scheme) == (
        "full",
        0.1,
        32,
        "logit_normal",
    )


def test_a_work_folder_of_another_recipe_is_not_resumed(tmp_path, capsys):
    from tools.default_model import train_model, train_vae

    train_vae.build_vae(0).save_pretrained(tmp_path / "vae")
    train_model.assemble(str(tmp_path / "vae"), str(tmp_path / "base"), seed=0)
    assert train_model.stale_base(str(tmp_path / "base")) is None
    config_file = tmp_path / "base" / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "patch_size": 2}))
    argv = ["--vae", str(tmp_path / "vae"), "--data", "unused.parquet", "--out", str(tmp_path)]
    assert train_model.main(argv) == 2  # before any training: its run/ would continue the old model
    assert "assembled by another recipe (patch_size 2 != 1)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluation_reports_adherence_per_attribute(tmp_path):
    from tools.default_model import train_model, train_vae
    from tools.default_model.evaluate import evaluate

    train_vae.build_vae(0).save_pretrained(tmp_path / "vae")
    train_model.assemble(str(tmp_path / "vae"), str(tmp_path / "base"), seed=0)
    report = evaluate(str(tmp_path / "base"), seeds=1, steps=1, out=str(tmp_path / "eval"))
    assert report["samples"] == 24 and report["max_sequence_length"] == 32
    assert set(report["adherence"]) == {"colour", "background", "shape", "shape_lenient"}
    assert len(list((tmp_path / "eval" / "images").iterdir())) == 24


# ---- the shipped model (jobs/default_model) ---------------------------------------------------

DEFAULT_MODEL = os.path.join(ROOT, "jobs", "default_model")
# DreamBooth-LoRA run and its sampling (measured on the shipped model)
LORA_STEPS, LORA_LR = 150, 2e-3
# Attention alone (the trainer's default) barely moves the colour (the patch-2 model: 150 steps at 1e-3, 0.17 orange);
# the colour comes in through the pooled text embedding and the adaLN modulations, so adapt those too.
LORA_LAYERS = (
    "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,"
    "attn.to_add_out,norm1.linear,norm1_context.linear,time_text_embed.text_embedder.linear_1,"
    "time_text_embed.text_embedder.linear_2,context_embedder"
)
SUBJECT_SEEDS, SUBJECT_SAMPLE_STEPS = 4, 28


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> str:
    """A program cache of this module's own for ``inference_optimize``."""
    return str(tmp_path_factory.mktemp("programs"))


def _optimised(pipe, programs: str):
    """The adherence runs sample hundreds of images: the transformer as static programs (float32,
    the eager images within 1e-5: tests/test_inference_program.py), six captions per call."""
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_inference_optimize(cache_dir=programs)
    return pipe


@pytest.fixture(scope="module")
def default_pipe(programs):
    from pipelines import StableDiffusion3Pipeline

    return _optimised(StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL), programs)


def test_the_default_model_is_a_small_64px_folder_with_t5_length_32(default_pipe):
    index = json.loads(open(os.path.join(DEFAULT_MODEL, "model_index.json")).read())
    assert index["_max_sequence_length"] == 32 and default_pipe.default_max_sequence_length == 32
    assert default_pipe.default_sample_size * default_pipe.vae_scale_factor == 64
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEFAULT_MODEL) for f in fs)
    assert size < 12e6, size


def test_the_default_model_follows_every_caption(default_pipe):
    """`sd3 generate`'s default model at its default settings (64x64, 28 steps, the folder's
    guidance 2 and T5 length 32) draws what each of the 24 captions asks, for 4 seeds each."""
    from jobs.job_config import DEFAULT_MODEL as job_default
    from tools.default_model.evaluate import evaluate

    assert os.path.realpath(job_default) == os.path.realpath(DEFAULT_MODEL)
    report = evaluate(DEFAULT_MODEL, seeds=4, steps=28, pipe=default_pipe)
    adherence = report["adherence"]
    print(f"adherence over {report['samples']} samples in {report['seconds']}s: {adherence}")
    assert report["samples"] == 96 and report["max_sequence_length"] == 32
    assert report["guidance_scale"] == 2.0  # model_index.json _guidance_scale (7 draws concave sides)
    # Measured on the shipped model (float16 weights, this machine): colour 1.00, background 1.00,
    # strict shape 0.83 (circle 1.00, square 0.50, triangle 1.00), lenient shape 0.90 (held-out
    # seeds 4-7: colour 1.00, strict 0.865). Chance: colour 0.25, background 0.5, shape 1/3.
    # Floors: the goals (colour and background >= 0.95, strict shape >= 0.8: the measured
    # 80 of 96 less 3 samples) and the measured lenient figure less a few samples.
    assert adherence["colour"] >= 0.95 and adherence["background"] >= 0.95
    assert adherence["shape_lenient"] >= 0.85
    assert adherence["shape"] >= 0.8


def test_dreambooth_lora_teaches_the_default_model_a_new_colour(default_pipe, programs, tmp_path):
    """`sd3 train dreambooth-lora` on 64 orange shapes captioned "a sks <shape> on a <bg>
    background" (a colour the model never saw): the share of orange sks shapes on the right
    background rises; red and yellow (orange's neighbours) captions mostly keep their colour."""
    from jobs.cli import main as sd3
    from pipelines import StableDiffusion3Pipeline
    from tools.default_model.evaluate import evaluate

    def subject_rate(report: dict) -> float:  # colour and background both right
        rows = report["rows"]
        return sum(r["got"]["colour"] == SUBJECT and r["got"]["background"] == r["want"]["background"]
                   for r in rows) / len(rows)  # fmt: skip

    start = time.time()
    sample = dict(seeds=SUBJECT_SEEDS, steps=SUBJECT_SAMPLE_STEPS)
    before = evaluate(DEFAULT_MODEL, pipe=default_pipe, colours=(SUBJECT,), **sample)
    data = str(tmp_path / "sks.parquet")
    shapes_data.write_parquet(data, 64, seed=1, colours=(SUBJECT,))
    argv = ["train", "dreambooth-lora", f"--pretrained_model_name_or_path={DEFAULT_MODEL}", f"--dataset={data}",
            "--caption_column=caption", f"--output_dir={tmp_path / 'lora'}", "--resolution=64",
            "--train_batch_size=8", f"--max_train_steps={LORA_STEPS}", f"--learning_rate={LORA_LR}",
            "--lr_warmup_steps=0", "--rank=4", f"--lora_layers={LORA_LAYERS}", "--cache_latents", "--seed=0", "--report_to=none",
            "--device=cpu", "--local"]  # fmt: skip
    assert sd3(argv) == 0
    taught = _optimised(StableDiffusion3Pipeline.from_pretrained(DEFAULT_MODEL), programs)
    taught.load_lora_weights(str(tmp_path / "lora"))
    after = evaluate(DEFAULT_MODEL, pipe=taught, colours=(SUBJECT,), **sample)
    neighbours = evaluate(DEFAULT_MODEL, pipe=taught, colours=("red", "yellow"), palette=tuple(shapes_data.PALETTE),
                          **sample)  # fmt: skip
    print(
        f"sks = orange: {subject_rate(before):.2f} before, {subject_rate(after):.2f} after "
        f"(colour {before['adherence']['colour']:.2f} -> {after['adherence']['colour']:.2f}); "
        f"red/yellow captions after: colour {neighbours['adherence']['colour']:.2f}; {time.time() - start:.0f}s"
    )
    # Measured here (24 samples each; the folder's guidance 2): orange on the right background 0.00
    # before (the model does not know "sks"), 1.00 after; red and yellow captions keep their colour
    # 0.56 of the time after (1.00 without the LoRA: the adapter leaks into its neighbours, which
    # prior preservation would limit). On the 8000-step transformer the same run gave 0.88 after;
    # on the 5000-step one 150 steps at 1e-3 gave 0.71 after and 0.73 kept, 250 at 1e-3 0.83 and
    # 0.56. Floors: the measured figures less a sample or two.
    assert subject_rate(before) <= 0.15
    assert subject_rate(after) >= 0.9 and subject_rate(after) - subject_rate(before) >= 0.7
    assert neighbours["adherence"]["colour"] >= 0.5
