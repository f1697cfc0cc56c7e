"""The name -> constructor table behind `build_model`."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from nclayers.errors import NCLayersError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    input_size: int  # side of the square input the model is built for
    family: str
    blocks: int | None = None  # expected block count, shown by `nclayers blocks` and README


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, input_size: int = 32, family: str = "", blocks: int | None = None):
    """Decorator: register `fn(num_classes, **options) -> nn.Module` under `name`."""

    def wrap(fn):
        if name in _REGISTRY:
            raise NCLayersError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, input_size, family, blocks)
        return fn

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    import fnmatch

    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise NCLayersError(
            f"model={name!r} is not registered.{hint} Known: {', '.join(list_models())}; "
            "or pass an entry point 'package.module:function'"
        )
    return _REGISTRY[name]


def load_entry_point(spec: str, **kwargs) -> nn.Module:
    """Build a model from 'package.module:function' (the function returns an nn.Module):
    `def net(num_classes: int, **options) -> nn.Module`, or a function without a
    `num_classes` parameter (it is then not passed; the head is checked against the data
    by the stages that need it)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise NCLayersError(f"entry point {spec!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise NCLayersError(f"entry point {spec!r} cannot be loaded: {err}") from err
    if "num_classes" in kwargs and not _takes(fn, "num_classes"):
        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    try:
        model = fn(**kwargs)
    except TypeError as err:
        if not _signature_error(fn, kwargs):
            raise
        raise NCLayersError(
            f"entry point {spec!r}: {err}; its options come from model.options (and "
            "model.width): set only the keywords the function takes"
        ) from None
    if not isinstance(model, nn.Module):
        raise NCLayersError(
            f"entry point {spec!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def _takes(fn: Callable, keyword: str) -> bool:
    """Whether `fn` accepts `keyword` (by name or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C function: assume it does
        return True
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _signature_error(fn: Callable, kwargs: dict) -> bool:
    """Whether calling `fn` with `kwargs` fails at the call itself (not inside it)."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError:
        return True
    except ValueError:
        return False
    return False


def build_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """Build a registered model, a Hugging Face model 'hf:PATH_OR_ID' (see
    `nclayers.models.hf`), or an entry point 'package.module:function'."""
    if name.startswith("hf:"):
        from nclayers.models.hf import build_hf_model

        return build_hf_model(name, num_classes, **options)
    if ":" in name:
        return load_entry_point(name, **({"num_classes": num_classes} | options))
    entry = get_entry(name)
    try:
        return entry.fn(num_classes=num_classes, **options)
    except TypeError as err:
        raise NCLayersError(f"model {name!r}: bad option ({err})") from err
