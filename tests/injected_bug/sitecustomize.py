"""Puts a bug into a real worker process: Python imports this module at start-up when this folder
is on PYTHONPATH, and it replaces each `module:attribute.path` named in $MULTILLM_TEST_BUG
(comma-separated) with a function that raises RuntimeError."""

from __future__ import annotations

import importlib
import os
from typing import NoReturn


def _injected(*args: object, **kwargs: object) -> NoReturn:
    raise RuntimeError("injected bug")


for target in filter(None, os.environ.get("MULTILLM_TEST_BUG", "").split(",")):
    module_name, _, path = target.partition(":")
    owner: object = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    assert hasattr(owner, name), f"{target}: no such attribute to break"
    setattr(owner, name, _injected)
