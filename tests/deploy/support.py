"""The Envoy bootstrap renderer, loaded from its path: ``deploy/`` is scripts, not a package of ours.

(Imported as ``deploy.envoy.render`` it would be a second name for the file mypy is given as
``render``, and ``envoy`` alone is taken by two installed packages.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
ENVOY_DIR: Final = ROOT / "deploy" / "envoy"
RENDER_PY: Final = ENVOY_DIR / "render.py"
MODULE_NAME: Final = "spiffe_sidecar_deploy_envoy_render"


def load_renderer() -> ModuleType:
    """``deploy/envoy/render.py`` as a module (registered first: dataclasses look their module up)."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, RENDER_PY)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module
