"""The defenses, one file each. Importing this package registers every module in it.

Adding a defense: a new file here with a `@register_defense("name")` dataclass, plus
`search_spaces/<name>.yaml` for its knobs. Nothing in the platform changes.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
