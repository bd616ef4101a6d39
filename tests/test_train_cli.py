"""`sd3 train` flags: the parser built from TrainConfig's fields is the hand-written one it replaced.

``tests/fixtures/cli/train_flags.json`` was written by :func:`parser_actions` from the hand-written
``_add_train_flags`` of commit a4b0532 (before the flags were derived from TrainConfig), with

    PYTHONPATH=$PWD .venv/bin/python -m tests.test_train_cli tests/fixtures/cli/train_flags.json

Do not regenerate it from the derived parser: it is the record of the flags users had.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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
        assert sorted(got) == sorted(want)
        for dest in want:
            assert got[dest] == want[dest], dest
        assert actual[kind]["namespace"] == expected[kind]["namespace"]


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(parser_actions(), indent=1) + "\n")
