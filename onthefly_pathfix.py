"""Let a script named like a package import that package (`lightning.py` importing lightning).

Python puts a script's own folder first on sys.path, so a training script saved as
`lightning.py` (as the product README names its Lightning example) finds itself when it
runs `import lightning` and fails with a partially-initialized module — and so does any
sibling script of it. This finder, installed by `onthefly_pathfix.pth` at interpreter
start, resolves only that case: a local `X.py` that imports `X` itself can never be the
module `X` anyone meant, so when a real `X` exists further down sys.path, that one is
imported. Local modules that do not import their own name are untouched.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any


def _self_importing(path: str, name: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            src = f.read(200_000)
    except OSError:
        return False
    pattern = rf"^\s*(import\s+{re.escape(name)}\b|from\s+{re.escape(name)}(\s+import|\.))"
    return re.search(pattern, src, re.MULTILINE) is not None


class _ScriptShadowFinder:
    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> Any:
        if path is not None or "." in fullname:
            return None
        local = {os.getcwd()}
        if sys.argv and sys.argv[0]:
            local.add(os.path.dirname(os.path.abspath(sys.argv[0])))
        shadowed = False
        rest = []
        for p in sys.path:
            d = os.path.abspath(p or os.getcwd())
            candidate = os.path.join(d, fullname + ".py")
            if d in local and os.path.isfile(candidate) and _self_importing(candidate, fullname):
                shadowed = True
                continue
            rest.append(p)
        if not shadowed:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, rest)


def install() -> None:
    if not any(f is _ScriptShadowFinder for f in sys.meta_path):
        sys.meta_path.insert(0, _ScriptShadowFinder)


install()
