"""Builds the tiny SD3 fixture pipelines and the diffusers reference outputs.

Run in the reference venv (torch + diffusers + transformers):

    .refvenv/bin/python tools/reference/make_tiny_checkpoints.py --out tests/fixtures
    .refvenv/bin/python tools/reference/make_tiny_checkpoints.py --only-model out/tiny-seed7 --seed 7

Deterministic on one CPU: same versions + same command = same files (another CPU may round a
few float outputs differently; see the fixtures README).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import readme  # noqa: E402
import reference_cases as rc  # noqa: E402
import replay  # noqa: E402
import tiny_models as tm  # noqa: E402
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

FIXTURE_SEEDS = {"sd3-tiny": 1, "sd35-tiny": 2}  # sd35-tiny-not5 = sd35-tiny without T5
DEFAULT_MODEL_SEED = 7
log = logging.getLogger("make_tiny_checkpoints")


def _quiet() -> None:
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def load_pipeline(folder: Path) -> StableDiffusion3Pipeline:
    index = json.loads((folder / "model_index.json").read_text())
    # diffusers refuses a folder whose model_index has text_encoder_3 = [null, null] unless the
    # caller passes the missing components explicitly.
    missing = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k) == [None, None]}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32, **missing)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_round_trip(built: StableDiffusion3Pipeline, loaded: StableDiffusion3Pipeline, folder: Path) -> None:
    """The saved folder must reload to exactly the in-memory weights."""
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(built, name), getattr(loaded, name)
        if a is None and b is None:
            continue
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys():
            raise RuntimeError(
                f"{folder}/{name}: keys differ after reload: {sorted(sa.keys() ^ sb.keys())[:10]}"
            )
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        if bad:
            raise RuntimeError(f"{folder}/{name}: values differ after reload: {bad[:10]}")


def check_tokenizer_forms(
    published: StableDiffusion3Pipeline, json_only: StableDiffusion3Pipeline
) -> list[str]:
    """Published files and tokenizer.json-only must give identical ids; returns notes."""
    import sentencepiece as spm

    texts = rc.TRICKY_TEXTS + [rc.LONG_PROMPT]
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        a = getattr(published, sub)(texts, padding="max_length", max_length=77, truncation=True).input_ids
        b = getattr(json_only, sub)(texts, padding="max_length", max_length=77, truncation=True).input_ids
        if a != b:
            diff = [t for t, x, y in zip(texts, a, b, strict=True) if x != y]
            raise RuntimeError(f"{sub}: published and tokenizer.json forms disagree on {diff}")
    notes = []
    sp = spm.SentencePieceProcessor(model_file=str(published.tokenizer_3.vocab_file))
    for text in texts:
        hf = published.tokenizer_3(text).input_ids
        raw = sp.encode(text) + [1]
        if hf != raw:
            notes.append(f"T5 ids from transformers differ from raw sentencepiece for {text!r}")
    return notes


def build_fixture_pipelines(out: Path, toks: tm.Tokenizers) -> dict[str, Path]:
    dirs = {}
    sd3 = tm.build_pipeline(tm.SD3_TINY, toks, FIXTURE_SEEDS["sd3-tiny"])
    dirs["sd3-tiny"] = out / "sd3-tiny"
    tm.save_pipeline(sd3, dirs["sd3-tiny"], tm.SD3_TINY, toks, shard=True)
    check_round_trip(sd3, load_pipeline(dirs["sd3-tiny"]), dirs["sd3-tiny"])

    sd35 = tm.build_pipeline(tm.SD35_TINY, toks, FIXTURE_SEEDS["sd35-tiny"])
    dirs["sd35-tiny"] = out / "sd35-tiny"
    tm.save_pipeline(sd35, dirs["sd35-tiny"], tm.SD35_TINY, toks, shard=False)
    check_round_trip(sd35, load_pipeline(dirs["sd35-tiny"]), dirs["sd35-tiny"])

    not5 = StableDiffusion3Pipeline(**{**sd35.components, "text_encoder_3": None, "tokenizer_3": None})
    dirs["sd35-tiny-not5"] = out / "sd35-tiny-not5"
    tm.save_pipeline(not5, dirs["sd35-tiny-not5"], tm.SD35_TINY, toks, shard=False)
    check_round_trip(not5, load_pipeline(dirs["sd35-tiny-not5"]), dirs["sd35-tiny-not5"])
    return dirs


def write_references(out: Path, dirs: dict[str, Path]) -> list[dict]:
    ref_dir = out / "references"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    pipes = {name: load_pipeline(path) for name, path in dirs.items()}
    generators = [
        rc.tokenizer_cases(pipes),
        rc.text_encoder_cases(pipes),
        rc.encode_prompt_cases(pipes),
        rc.scheduler_cases(dirs),
        rc.transformer_cases(pipes),
        rc.vae_cases(pipes),
        rc.pipeline_cases(pipes),
        rc.img2img_cases(pipes),
        rc.single_file_cases(dirs),
        rc.float8_cases(),
    ]
    index = []
    for gen in generators:
        for case in gen:
            for key, arr in case.arrays.items():
                if not key.startswith(("in_", "out_")) or arr.dtype == object:
                    raise RuntimeError(f"case {case.name}: bad array {key} ({arr.dtype})")
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise RuntimeError(f"case {case.name}: {key} has non-finite values")
            np.savez(ref_dir / f"{case.name}.npz", **case.arrays)
            index.append(
                {
                    "name": case.name,
                    "kind": case.kind,
                    "fixture": case.fixture,
                    "file": f"{case.name}.npz",
                    "args": case.args,
                    "arrays": {
                        k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in case.arrays.items()
                    },
                }
            )
            log.info("case %s", case.name)
    (ref_dir / "cases.json").write_text(
        json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return index


def _versions() -> dict[str, str]:
    import diffusers
    import sentencepiece
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": sentencepiece.__version__,
        "numpy": np.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("tests/fixtures"),
        help="fixture root: pipelines + references/ + README.md",
    )
    parser.add_argument(
        "--only-model",
        type=Path,
        default=None,
        help="write just one sd3-tiny-config pipeline folder here (published tokenizer files)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_MODEL_SEED, help="weight seed for --only-model")
    parser.add_argument("--no-references", action="store_true", help="pipelines only")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="after writing, replay every case from cases.json alone and compare exactly",
    )
    parser.add_argument(
        "--verify-only", action="store_true", help="only replay the existing references in --out"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # deterministic summation order; the machine is shared anyway
    start = time.time()
    if args.verify_only:
        return _verify(args.out, start)
    toks = tm.train_tokenizers()

    if args.only_model is not None:
        pipe = tm.build_pipeline(tm.SD3_TINY, toks, args.seed)
        tm.save_pipeline(pipe, args.only_model, tm.SD3_TINY, toks, shard=False)
        check_round_trip(pipe, load_pipeline(args.only_model), args.only_model)
        size = sum(tm.pipeline_files(args.only_model).values())
        log.info(
            "wrote %s (%d bytes, seed %d) in %.1fs", args.only_model, size, args.seed, time.time() - start
        )
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    dirs = build_fixture_pipelines(args.out, toks)
    notes = check_tokenizer_forms(load_pipeline(dirs["sd3-tiny"]), load_pipeline(dirs["sd35-tiny"]))
    for note in notes:
        log.warning(note)
    index = [] if args.no_references else write_references(args.out, dirs)
    facts = {
        "clip_vocab": len(toks.vocab),
        "merges": len(toks.merges),
        "bos": toks.vocab[tm.tt.BOS],
        "eos": toks.vocab[tm.tt.EOS],
        "t5_vocab": toks.t5_vocab_size,
        "spiece": tm.tt.spiece_size(toks.spiece),
        "t5_tokens": tm.tt.spiece_size(toks.spiece) + tm.tt.T5_EXTRA_IDS,
    }
    readme.write(args.out, dirs, index, _versions(), FIXTURE_SEEDS, DEFAULT_MODEL_SEED, facts, notes)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log.info("wrote %s: %d cases, %.1f MB in %.1fs", args.out, len(index), total / 1e6, time.time() - start)
    return _verify(args.out, start) if args.verify and index else 0


def _verify(out: Path, start: float) -> int:
    n = replay.verify(out, load_pipeline)
    log.info(
        "replayed %d cases from %s/references/cases.json: all identical (%.1fs)", n, out, time.time() - start
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
