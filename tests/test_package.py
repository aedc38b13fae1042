"""Package-wide checks of how the toolkit's classes sit on torch's and Lightning's."""

import importlib
import inspect
import pkgutil

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.methods import SimCLR

import ssl_toolkit


def _toolkit_classes() -> list[type]:
    classes = {}
    for info in pkgutil.walk_packages(ssl_toolkit.__path__, "ssl_toolkit."):
        for _, cls in inspect.getmembers(importlib.import_module(info.name), inspect.isclass):
            if cls.__module__.startswith("ssl_toolkit."):
                classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(classes.values())


def _incompatible_overrides(cls: type) -> list[str]:
    """Methods of ``cls`` named like a base class's that the base's callers cannot call with the base's arguments."""
    found = []
    for name, fn in vars(cls).items():
        if name.startswith("__") or not inspect.isfunction(fn):
            continue
        base = next((b for b in cls.__mro__[1:] if name in vars(b)), None)
        if base is None or not callable(vars(base)[name]):
            continue
        try:
            theirs = inspect.signature(vars(base)[name])
        except (TypeError, ValueError):  # a builtin without a signature
            continue
        params = theirs.parameters.values()
        if any(p.kind is p.VAR_POSITIONAL for p in params):  # forward(*input), hooks(*args): anything goes
            continue
        required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        try:
            inspect.signature(fn).bind(*range(len(required)))
        except TypeError as e:
            found.append(f"{cls.__module__}.{cls.__qualname__}.{name}{inspect.signature(fn)} overrides "
                         f"{base.__module__}.{base.__qualname__}.{name}{theirs}: {e}")
    return found


def test_no_method_shadows_a_base_class_method_its_callers_cannot_call():
    """A method named like one of its base's (torch's nn.Module, Lightning's, the toolkit's own) is what the base's
    callers reach. Two such collisions broke real use: the views' ``apply(images, params)`` made ``model.apply(fn)``,
    PyTorch's idiom for custom initialisation, a TypeError on every contrastive method, and the image folder's
    ``_split(split_dir, classes)`` stopped training on image folders at the first batch."""
    classes = _toolkit_classes()
    assert len(classes) >= 50  # 60 today: the walk found the package
    bad = [line for cls in classes for line in _incompatible_overrides(cls)]
    assert not bad, "\n".join(bad)


def test_module_apply_reaches_every_submodule():
    model = SimCLR(BackboneConfig("tiny_cnn", width=4))
    seen = []
    model.apply(seen.append)
    assert len(seen) == len(list(model.modules())) and model.view_policy in seen
