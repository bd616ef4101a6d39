"""`sd3 train` flags: the parser built from TrainConfig's fields is the hand-written one it replaced.

``tests/fixtures/cli/train_flags.json`` was written by :func:`parser_actions` from the hand-written
``_add_train_flags`` of commit a4b0532 (before the flags were derived from TrainConfig), with

    PYTHONPATH=$PWD .venv/bin/python -m tests.test_train_cli tests/fixtures/cli/train_flags.json

Do not regenerate it from the derived parser: it is the record of the flags users had. A field
added to TrainConfig since adds its flag; every recorded flag stays as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from pipelines.training.config import WEIGHTING_SCHEMES, TrainConfig, config_flags

FIXTURE = Path(__file__).parent / "fixtures" / "cli" / "train_flags.json"
MINIMAL = ["--pretrained_model_name_or_path=m", "--output_dir=o"]


def _plain(value: Any) -> Any:
    """``value`` as JSON holds it (a type by its name, anything else unusual by its repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _kind_parsers() -> dict[str, argparse.ArgumentParser]:
    from jobs.cli import build_parser

    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices

    return subparsers(subparsers(build_parser())["train"])


def parser_actions() -> dict[str, Any]:
    """Per `sd3 train` kind: every flag's option strings, dest, action, type, choices, default,
    nargs, const, required, help and group, and the namespace of a minimal command line."""
    out = {}
    for kind, parser in _kind_parsers().items():
        groups = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
        actions = [
            {
                "option_strings": a.option_strings,
                "dest": a.dest,
                "action": type(a).__name__,
                "type": _plain(a.type),
                "choices": _plain(a.choices),
                "default": _plain(a.default),
                "nargs": a.nargs,
                "const": _plain(a.const),
                "required": a.required,
                "help": a.help,
                "group": groups[id(a)],
            }
            for a in parser._actions
        ]
        namespace = {k: _plain(v) for k, v in sorted(vars(parser.parse_args(MINIMAL)).items())}
        out[kind] = {"actions": actions, "namespace": namespace}
    return out


def _by_dest(actions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    # Choices compare as sets: what is accepted (their order in --help may follow the declaration).
    return {a["dest"]: {**a, "choices": a["choices"] and sorted(a["choices"])} for a in actions}


def test_train_parser_has_the_flags_of_the_hand_written_one():
    expected = json.loads(FIXTURE.read_text())
    actual = parser_actions()
    assert sorted(actual) == sorted(expected) == ["dreambooth", "dreambooth-lora"]
    for kind in expected:
        want, got = _by_dest(expected[kind]["actions"]), _by_dest(actual[kind]["actions"])
        assert len(got) == len(actual[kind]["actions"])  # one action per dest
        # Only a field declared after the record may add a flag (and its namespace entry).
        added = {spec.name for spec in config_flags()} - set(want)
        assert sorted(got) == sorted([*want, *added])
        for dest in want:
            assert got[dest] == want[dest], dest
        namespace = {k: v for k, v in actual[kind]["namespace"].items() if k not in added}
        assert namespace == expected[kind]["namespace"]


def _other_value(spec, default: Any) -> str | None:
    """A command-line value for ``spec`` other than ``default`` (None: a store_true flag)."""
    if spec.flag.choices:
        return next(c for c in spec.flag.choices if c != default)
    if spec.flag_type is bool:
        return None
    if spec.flag_type is int:
        return "1" if default in (0, False) else str((default or 0) + 16)
    if spec.flag_type is float:
        return "0.25"
    return f"{spec.name}-value"


def test_every_flag_reaches_its_config_field():
    from jobs.cli import build_parser
    from jobs.train_cli import config_from_args

    defaults = build_parser().parse_args(["train", "dreambooth", *MINIMAL])
    argv = ["train", "dreambooth"]
    for spec in config_flags():
        value = _other_value(spec, getattr(defaults, spec.name))
        argv += [spec.option_strings[-1]] + ([] if value is None else [value])
    cfg, default_cfg = (config_from_args(build_parser().parse_args(argv)), config_from_args(defaults))
    for spec in config_flags():
        got = getattr(cfg, spec.name)
        assert type(got) is spec.type and got != getattr(default_cfg, spec.name), spec.name
    assert cfg.precondition_outputs is True  # the 0/1 flag is a bool in the config
    assert cfg.dataset == "dataset-value"  # given as --dataset_name
    # Fields that are no flag of their own come from the sub-command and the other flags.
    assert (cfg.mode, cfg.cache_text_embeddings, cfg.validation_guidance_scale) == ("full", True, 7.0)


def test_check_refuses_a_value_outside_the_declared_choices():
    base = TrainConfig(pretrained_model_name_or_path="m", output_dir="o", dataset="t.parquet")
    base.check()
    with_choices = [spec for spec in config_flags() if spec.flag.choices]
    assert sorted(s.name for s in with_choices) == [
        "device", "mixed_precision", "prior_generation_precision", "report_to", "weighting_scheme",
    ]  # fmt: skip
    for spec in with_choices:
        for choice in spec.flag.choices:
            dataclasses.replace(base, **{spec.name: choice}).check()
        bad = dataclasses.replace(base, **{spec.name: "bogus"})
        choices = ", ".join(spec.flag.choices)
        with pytest.raises(ValueError, match=re.escape(f"--{spec.name}='bogus' must be one of {choices}")):
            bad.check()
        none = dataclasses.replace(base, **{spec.name: None})
        if spec.nullable:
            none.check()
        else:
            with pytest.raises(ValueError, match=f"--{spec.name}=None must be one of"):
                none.check()
    with pytest.raises(ValueError, match=re.escape("--mixed_precision='fp32' must be one of no, fp16, bf16")):
        dataclasses.replace(base, mixed_precision="fp32").check()


def test_weighting_scheme_choices_are_the_training_losss_schemes():
    from sd3_core.training import split_scheme

    for name in WEIGHTING_SCHEMES:
        split_scheme(name)
    with pytest.raises(ValueError, match=re.escape(f"is not one of {sorted(WEIGHTING_SCHEMES)}")):
        split_scheme("bogus")


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(parser_actions(), indent=1) + "\n")
