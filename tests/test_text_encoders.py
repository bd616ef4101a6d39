"""Text encoders and tokenizers reproduce transformers 5 on the tiny SD3 / SD3.5 fixtures.

The references (tests/fixtures/references, kinds "tokenizer" and "text_encoder") were made by
transformers 5.23 from the same folders: sd3-tiny holds the published tokenizer files
(vocab.json + merges.txt, spiece.model) and legacy CLIP configs (eos_token_id 2: pool the
largest id); sd35-tiny holds tokenizer.json-only folders and CLIP configs with the real eos id.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from sd3_core import text_encoder_folder
from sd3_core.clip_text_encoder import load_clip_text_encoder
from sd3_core.prompt_tokenizer import PromptTokenizer
from sd3_core.safetensors_io import WeightsFileError, open_weights
from sd3_core.t5_encoder import load_t5_encoder
from sd3_core.tokenizer_loading import load_clip_tokenizer, load_t5_tokenizer
from sd3_core.torch_state import WeightLoadError

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCES = FIXTURES / "references"
TOLERANCE = 1e-4  # max abs difference to transformers' float32 outputs


def _cases(kind: str, subfolders: tuple[str, ...] | None = None) -> list[dict]:
    cases = json.loads((REFERENCES / "cases.json").read_text(encoding="utf-8"))
    return [
        c for c in cases if c["kind"] == kind and (subfolders is None or c["args"]["subfolder"] in subfolders)
    ]


def _params(cases: list[dict]):
    return [pytest.param(c, id=c["name"]) for c in cases]


def _reference(case: dict) -> dict[str, np.ndarray]:
    with np.load(REFERENCES / case["file"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _folder(case: dict) -> Path:
    return FIXTURES / case["fixture"] / case["args"]["subfolder"]


@functools.cache
def _tokenizer(folder: Path) -> PromptTokenizer:
    return load_t5_tokenizer(folder) if folder.name == "tokenizer_3" else load_clip_tokenizer(folder)


@functools.cache
def _encoder(folder: Path):
    return load_t5_encoder(folder) if folder.name == "text_encoder_3" else load_clip_text_encoder(folder)


def _fixed(tok, texts, length: int):
    """SD3's tokenization: padded and truncated to ``length``, NumPy ids."""
    return tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")


def _run(encoder, input_ids: np.ndarray):
    with paddle.no_grad():
        return encoder(paddle.to_tensor(input_ids))


def _max_diff(a, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a.numpy() if hasattr(a, "numpy") else a, dtype=np.float64) - b).max())


# ---------------------------------------------------------------------------------------------
# tokenizers


@pytest.mark.parametrize("case", _params(_cases("tokenizer")))
def test_tokenizer_ids_and_removed_text_equal_transformers(case):
    ref = _reference(case)
    tok = _tokenizer(_folder(case))
    batch = _fixed(tok, case["args"]["texts"], case["args"]["max_length"])
    assert batch.input_ids.dtype == np.int64
    np.testing.assert_array_equal(batch.input_ids, ref["out_input_ids"])
    assert batch.removed == [str(s) for s in ref["out_removed"]]


@pytest.mark.parametrize("fixture", ["sd3-tiny", "sd35-tiny"])
def test_tokenizers_pad_with_the_folders_pad_token(fixture):
    texts = ["a cat"]
    clip_l = _tokenizer(FIXTURES / fixture / "tokenizer")
    clip_g = _tokenizer(FIXTURES / fixture / "tokenizer_2")
    t5 = _tokenizer(FIXTURES / fixture / "tokenizer_3")
    eos = clip_l.backend.token_id("<|endoftext|>")
    assert _fixed(clip_l, texts, 77).input_ids[0, -1] == eos  # CLIP-L pads with <|endoftext|>
    assert _fixed(clip_g, texts, 77).input_ids[0, -1] == clip_g.backend.token_id("!")  # CLIP-G with "!"
    ids = _fixed(t5, texts, 16).input_ids[0].tolist()
    assert ids[-1] == t5.pad_token_id == t5.backend.token_id("<pad>")
    assert t5.backend.token_id("</s>") in ids  # eos appended before the padding


def test_both_tokenizer_folder_forms_give_the_same_ids():
    # sd3-tiny (published files) and sd35-tiny (tokenizer.json) were built from the same vocabularies.
    texts = _cases("tokenizer")[0]["args"]["texts"]
    for sub, length in [("tokenizer", 77), ("tokenizer_2", 77), ("tokenizer_3", 32)]:
        published = _fixed(_tokenizer(FIXTURES / "sd3-tiny" / sub), texts, length)
        json_only = _fixed(_tokenizer(FIXTURES / "sd35-tiny" / sub), texts, length)
        np.testing.assert_array_equal(published.input_ids, json_only.input_ids, err_msg=sub)


@pytest.mark.parametrize("sub", ["tokenizer", "tokenizer_2", "tokenizer_3"])
@pytest.mark.parametrize("fixture", ["sd3-tiny", "sd35-tiny"])
def test_tokenizer_save_pretrained_round_trip(tmp_path, fixture, sub):
    tok = _tokenizer(FIXTURES / fixture / sub)
    tok.save_pretrained(tmp_path / sub)
    again = _tokenizer.__wrapped__(tmp_path / sub)
    texts = ["A photo of a CAT!", "special </s> <|endoftext|>", ""]
    np.testing.assert_array_equal(_fixed(again, texts, 20).input_ids, _fixed(tok, texts, 20).input_ids)
    assert again.model_max_length == tok.model_max_length


def test_bare_spiece_model_folder_uses_transformers_defaults(tmp_path):
    # No tokenizer_config.json: <pad>/</s>/<unk> and 100 <extra_id_N> tokens, as transformers assumes.
    shutil.copy(FIXTURES / "sd3-tiny" / "tokenizer_3" / "spiece.model", tmp_path)
    bare = load_t5_tokenizer(tmp_path)
    configured = _tokenizer(FIXTURES / "sd3-tiny" / "tokenizer_3")
    texts = ["A photo of a CAT </s> <extra_id_3>", ""]
    np.testing.assert_array_equal(_fixed(bare, texts, 24).input_ids, _fixed(configured, texts, 24).input_ids)


def test_tokenizer_call_takes_transformers_arguments():
    """diffusers' own calls (SD3's `_get_clip_prompt_embeds`), with Paddle tensors for torch's."""
    tok = _tokenizer(FIXTURES / "sd3-tiny" / "tokenizer")
    long = " ".join(["lighthouse"] * 100)
    fixed = tok(["a cat", long], padding="max_length", max_length=77, truncation=True, return_tensors="pd")
    assert isinstance(fixed.input_ids, paddle.Tensor) and fixed.input_ids.shape == [2, 77]
    np.testing.assert_array_equal(fixed.input_ids.numpy(), _fixed(tok, ["a cat", long], 77).input_ids)
    assert fixed.attention_mask.numpy().sum(1).tolist() == [len(tok.encode("a cat")), 77]
    longest = tok(["a cat", long], padding="longest", return_tensors="np").input_ids
    assert longest.shape == (2, len(tok.encode(long))) > (2, 77)  # not truncated: transformers' default
    single = tok("a cat")  # one string, no padding: lists, as transformers returns them
    assert single.input_ids == [tok.encode("a cat")] and single.attention_mask == [
        [1] * len(single.input_ids[0])
    ]
    assert tok(["a cat", long]).input_ids == [tok.encode("a cat"), tok.encode(long)]  # ragged


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=["a cat"], max_length=2, truncation=True), "max_length=2 leaves no room"),  # bos + eos
        (dict(text="a cat", return_tensors="pt"), "torch is not used here: use 'pd' (Paddle), 'np' or None"),
        (dict(text=["a", "a cat"], return_tensors="np"), "needs rows of one length: pass padding=True"),
        (dict(text="a cat", padding="right"), "padding='right' is not supported"),
        (dict(text="a cat", add_special_tokens=False), "add_special_tokens=False is not supported"),
        (dict(text=[1, 2]), "text must be a string or a list of strings"),
    ],
)
def test_tokenizer_rejects_bad_arguments(kwargs, message):
    tok = _tokenizer(FIXTURES / "sd3-tiny" / "tokenizer")
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        tok(**kwargs)


def test_missing_tokenizer_folder_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip_tokenizer(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no CLIP tokenizer files .*vocab\.json"):
        load_clip_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match=r"empty: no T5 tokenizer files .*spiece\.model"):
        load_t5_tokenizer(empty)
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    shutil.copy(FIXTURES / "sd3-tiny" / "tokenizer" / "vocab.json", only_vocab)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_clip_tokenizer(only_vocab)


# ---------------------------------------------------------------------------------------------
# encoders


@pytest.mark.parametrize("case", _params(_cases("text_encoder", ("text_encoder", "text_encoder_2"))))
def test_clip_encoder_equals_transformers(case):
    ref = _reference(case)
    encoder = _encoder(_folder(case))
    out = _run(encoder, ref["in_input_ids"])
    text_embeds, hidden_states = out.text_embeds, out.hidden_states
    assert out[0] is text_embeds  # transformers' order: text_embeds, last_hidden_state, hidden_states
    assert _max_diff(text_embeds, ref["out_text_embeds"]) < TOLERANCE
    with paddle.no_grad():
        final_norm = encoder.text_model.ln_final(hidden_states[-1])
    assert _max_diff(out.last_hidden_state, final_norm.numpy()) == 0.0
    assert len(hidden_states) == len(ref["out_hidden_states"])  # embeddings + every layer
    for i, (ours, theirs) in enumerate(zip(hidden_states, ref["out_hidden_states"], strict=True)):
        assert _max_diff(ours, theirs) < TOLERANCE, f"hidden_states[{i}]"


@pytest.mark.parametrize("case", _params(_cases("text_encoder", ("text_encoder_3",))))
def test_t5_encoder_equals_transformers(case):
    ref = _reference(case)
    out = _run(_encoder(_folder(case)), ref["in_input_ids"])
    assert out[0] is out.last_hidden_state  # transformers' `text_encoder_3(ids)[0]`
    assert _max_diff(out.last_hidden_state, ref["out_last_hidden_state"]) < TOLERANCE


@pytest.mark.parametrize("case", _params([c for c in _cases("text_encoder") if c["args"].get("prompts")]))
def test_encoder_reference_inputs_are_our_tokenizers_output(case):
    ref = _reference(case)
    sub = case["args"]["subfolder"].replace("text_encoder", "tokenizer")
    tok = _tokenizer(FIXTURES / case["fixture"] / sub)
    ids = _fixed(tok, case["args"]["prompts"], ref["in_input_ids"].shape[1]).input_ids
    np.testing.assert_array_equal(ids, ref["in_input_ids"])


@pytest.mark.parametrize(
    ("eos_token_id", "pooled_position"),
    [(2, 2), (900, 4)],  # transformers' legacy rule (largest id) vs the first eos_token_id
)
def test_clip_pools_the_token_transformers_pools(tmp_path, eos_token_id, pooled_position):
    folder = tmp_path / "text_encoder"
    shutil.copytree(FIXTURES / "sd35-tiny" / "text_encoder", folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = eos_token_id
    (folder / "config.json").write_text(json.dumps(config))
    encoder = load_clip_text_encoder(folder)
    ids = np.array([[912, 5, 913, 7, 900, 900, 900]], dtype=np.int64)  # largest id at 2, eos 900 at 4..6
    text_embeds, _, hidden_states = _run(encoder, ids)
    with paddle.no_grad():
        per_token = encoder.text_projection(encoder.text_model.ln_final(hidden_states[-1]))
    assert _max_diff(text_embeds[0], per_token[0, pooled_position].numpy()) < 1e-6


@pytest.mark.parametrize("sub", ["text_encoder", "text_encoder_3"])
def test_encoder_save_pretrained_writes_the_transformers_layout(tmp_path, sub):
    source = FIXTURES / "sd3-tiny" / sub  # text_encoder_3 is sharded; the copy is one file
    encoder = _encoder(source)
    encoder.save_pretrained(tmp_path / sub)
    assert json.loads((tmp_path / sub / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    original = open_weights(source, "model.safetensors")
    written = open_weights(tmp_path / sub, "model.safetensors")
    try:
        assert sorted(written) == sorted(original)
        for key in original:
            np.testing.assert_array_equal(written.get(key), original.get(key), err_msg=key)
    finally:
        original.close()
        written.close()


def test_t5_honours_relative_attention_max_distance(tmp_path):
    # paddlenlp alone always buckets with max_distance 128; transformers reads the config.
    folder = tmp_path / "text_encoder_3"
    shutil.copytree(FIXTURES / "sd3-tiny" / "text_encoder_3", folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["relative_attention_max_distance"] == 128
    config["relative_attention_max_distance"] = 20
    (folder / "config.json").write_text(json.dumps(config))
    ids = _reference(_cases("text_encoder", ("text_encoder_3",))[0])["in_input_ids"]
    near = _run(load_t5_encoder(folder), ids).last_hidden_state
    far = _run(_encoder(FIXTURES / "sd3-tiny" / "text_encoder_3"), ids).last_hidden_state
    assert _max_diff(near, far.numpy()) > 1e-3  # 32 tokens: distances 20..31 now share a bucket


def test_encoder_config_is_the_transformers_config():
    encoder = _encoder(FIXTURES / "sd3-tiny" / "text_encoder_2")
    assert encoder.config.projection_dim == 48
    assert encoder.config.hidden_act == "gelu"


def test_float16_checkpoints_run_in_float32_on_cpu():
    # Paddle's CPU build has no half-precision matmul/layer_norm kernels (see dtypes.compute_dtype).
    if not paddle.get_device().startswith("cpu"):
        pytest.skip("CPU-only behaviour")
    encoder = load_clip_text_encoder(FIXTURES / "sd3-tiny" / "text_encoder", dtype="float16")
    assert encoder.dtype == paddle.float32
    with pytest.raises(ValueError, match="float64"):
        load_t5_encoder(FIXTURES / "sd3-tiny" / "text_encoder_3", dtype="float64")


@pytest.mark.parametrize(
    ("sub", "dtype"),
    [
        ("text_encoder", "float16"),
        # CLIP in bfloat16 is left out: building paddlenlp's causal mask needs a bfloat16 `triu`
        # kernel, which only Paddle's GPU build has.
        ("text_encoder_3", "float16"),
        ("text_encoder_3", "bfloat16"),
    ],
)
def test_half_precision_load_path_where_kernels_exist(monkeypatch, sub, dtype):
    # Pretend the device has half kernels (GPU): weights must then be held in that dtype.
    monkeypatch.setattr(text_encoder_folder, "compute_dtype", lambda d: d)
    load = load_t5_encoder if sub == "text_encoder_3" else load_clip_text_encoder
    encoder = load(FIXTURES / "sd3-tiny" / sub, dtype=dtype)
    dtypes = {name: str(p.dtype) for name, p in encoder.named_parameters()}
    # transformers keeps T5's feed-forward ``wo`` in float32 when loading float16 (only).
    float32 = {n for n in dtypes if sub == "text_encoder_3" and dtype == "float16" and ".wo." in n}
    assert {dtypes[n] for n in float32} <= {"paddle.float32"}
    assert {d for n, d in dtypes.items() if n not in float32} == {f"paddle.{dtype}"}
    if float32:
        name = next(iter(sorted(float32)))
        index = open_weights(FIXTURES / "sd3-tiny" / sub, "model.safetensors")
        expected = index.get(name.removeprefix("model.")).T
        index.close()
        np.testing.assert_array_equal(encoder.state_dict()[name].numpy(), expected)
    assert paddle.get_default_dtype() == "float32"  # restored after building


def test_missing_encoder_folder_and_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip_text_encoder(tmp_path / "nowhere")
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_t5_encoder(folder)
    shutil.copy(FIXTURES / "sd3-tiny" / "text_encoder" / "config.json", folder)
    with pytest.raises(WeightsFileError, match="model.safetensors"):
        load_clip_text_encoder(folder)


def test_checkpoint_that_does_not_fit_names_folder_and_keys(tmp_path):
    folder = tmp_path / "text_encoder"
    shutil.copytree(FIXTURES / "sd3-tiny" / "text_encoder", folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match=r"text_encoder.*missing keys.*encoder\.layers\.\d+\.mlp\.fc1"):
        load_clip_text_encoder(folder)


def test_unsupported_architecture_is_named(tmp_path):
    folder = tmp_path / "text_encoder"
    shutil.copytree(FIXTURES / "sd3-tiny" / "text_encoder", folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "silu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"text_encoder: hidden_act='silu' is not supported"):
        load_clip_text_encoder(folder)


_PADDLENLP_PROBE = """
import sys{first}
from sd3_core.paddlenlp_shim import paddlenlp_modules
import paddle.nn.functional as F
paddlenlp_modules()
loaded = [m for m in ("paddlenlp.taskflow", "paddlenlp.dataaug", "datasets", "sklearn") if m in sys.modules]
print(loaded, hasattr(F, "quick_gelu"))
import paddlenlp
from paddlenlp import Taskflow
print("paddlenlp.taskflow" in sys.modules, Taskflow.__module__, paddlenlp.SimpleServer.__name__)
"""


@pytest.mark.parametrize("first", ["", "\nimport paddlenlp"], ids=["shim-first", "paddlenlp-first"])
def test_the_encoders_load_only_paddlenlp_transformers_and_the_package_stays_whole(first):
    """The encoders' import skips paddlenlp's toolkit (taskflow, datasets, scikit-learn); the
    first use of anything else of the package runs its real __init__, so other code sees it whole.
    Imported before, paddlenlp is used as it is."""
    import subprocess
    import sys

    probe = _PADDLENLP_PROBE.format(first=first)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    expected_loaded = (
        "[]" if not first else "['paddlenlp.taskflow', 'paddlenlp.dataaug', 'datasets', 'sklearn']"
    )
    assert lines == [f"{expected_loaded} True", "True paddlenlp.taskflow.taskflow SimpleServer"], out.stdout
