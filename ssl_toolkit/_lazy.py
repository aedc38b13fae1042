"""A package's names that load with their module on first use (PEP 562), so that importing the package, or one
light module of it, does not import Lightning and Kornia for names the caller never reads."""

import importlib
import sys


def lazy_names(package: str, modules: dict[str, tuple[str, ...]]):
    """``(home, __getattr__, __dir__)`` for the package named ``package``, whose names in ``modules`` (module ->
    names) import their module when first read. The value is then kept in the package, so later reads are plain
    lookups. ``home`` maps each name to its module.

    No name may be that of one of the package's own modules: importing ``package.name`` sets the attribute to the
    module, and the name would then read as the module, not as what it defines."""
    home = {name: module for module, names in modules.items() for name in names}
    namespace = vars(sys.modules[package])

    def __getattr__(name: str):
        module = home.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(home))

    return home, __getattr__, __dir__
