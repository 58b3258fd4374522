"""Let a script named like a package import that package (`lightning.py` importing lightning).

Python puts a script's own folder first on sys.path, so a training script saved as
`lightning.py` (as the product README names its Lightning example) finds itself when it
runs `import lightning` and fails with a partially-initialized module. This finder,
installed by `onthefly_pathfix.pth` at interpreter start, resolves only that one case:
the running script imports its own file name and a real package of that name exists
further down sys.path — then the real package is imported. Everything else is untouched.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any


class _ScriptShadowFinder:
    @classmethod
    def find_spec(
        cls, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> Any:
        if path is not None or "." in fullname or not sys.argv or not sys.argv[0]:
            return None
        script = os.path.abspath(sys.argv[0])
        if os.path.splitext(os.path.basename(script))[0] != fullname:
            return None
        # The script's folder and the working folder hold same-named scripts, not the package.
        local = {os.path.dirname(script), os.getcwd()}
        rest = [
            p
            for p in sys.path
            if not (
                os.path.abspath(p or os.getcwd()) in local
                and os.path.isfile(
                    os.path.join(os.path.abspath(p or os.getcwd()), fullname + ".py")
                )
            )
        ]
        if len(rest) == len(sys.path):
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, rest)


def install() -> None:
    if not any(f is _ScriptShadowFinder for f in sys.meta_path):
        sys.meta_path.insert(0, _ScriptShadowFinder)


install()
