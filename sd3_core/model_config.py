"""Model configs: the diffusers ``config.json`` a model was built from, recorded by ``@register_to_config``."""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Config", "json_ready", "missing_config", "read_json_object", "register_to_config"]


def read_json_object(file: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from `file`; a missing file, bad JSON or a non-object names the file."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


class Config(dict):
    """A dict whose keys are also attributes (``model.config.joint_attention_dim``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def missing_config(cls: type) -> str:
    """The error for a model class whose own ``__init__`` is not decorated (so it has no config)."""
    return (
        f"{cls.__name__} has no config: decorate its __init__ with @sd3_core.model_config.register_to_config"
    )


def register_to_config(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate a model's ``__init__``: its bound arguments (defaults filled in) become
    ``self.config``. Only the outermost decorated ``__init__`` records (a subclass calling its
    parent's ``__init__`` keeps its own arguments). A subclass that defines an ``__init__`` must
    decorate it too: built through an undecorated one it is refused (TypeError), since the
    parent's arguments are not its config."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording_init(self, *args: Any, **kwargs: Any) -> None:
        outermost = "_config_recording" not in self.__dict__
        if outermost:
            if type(self).__init__ is not recording_init:  # an undecorated subclass __init__ called us
                raise TypeError(missing_config(type(self)))
            object.__setattr__(self, "_config_recording", True)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            config = {k: v for k, v in bound.arguments.items() if k != "self"}
        init(self, *args, **kwargs)
        if outermost:
            object.__setattr__(self, "_config", Config(config))

    return recording_init


def json_ready(value: Any) -> Any:
    """``value`` with tuples as lists, as JSON writes them."""
    if isinstance(value, tuple | list):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value
