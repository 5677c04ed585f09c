"""The registered exchanges besides ``allgather`` (:mod:`gradsieve.exchange`), one module each.
Importing this package imports every module in it, which fills the registry: adding an exchange is
adding one file here."""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
