"""Recipes the server knows: YAML files of SFTConfig fields in ``settings.recipes_dir``.

A job that names a known recipe takes it as its base; the request's own fields win.
A name the server does not know is only recorded, as the job's lineage label.
"""

from __future__ import annotations

from typing import Any

import yaml

from thinkforge.platform.errors import InvalidRequest
from thinkforge.platform.settings import Settings


def load_recipe(settings: Settings, name: str) -> dict[str, Any]:
    path = settings.recipes_dir / f"{name}.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidRequest(
            f"recipe {name!r} on the server is not valid YAML: {exc}", param="recipe"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"recipe {name!r} on the server is not a mapping", param="recipe")
    return data
