"""Docs that are generated from code stay current: the settings table of docs/contracts.md, and
the list of settings models behind it (`humpback settings`)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

from pydantic import BaseModel

from humpback.cli import SETTINGS, TABLE_END, TABLE_START, settings_models
from humpback.settings import settings_table

REPO = Path(__file__).resolve().parent.parent


def _declares_settings(cls: type[BaseModel]) -> bool:
    """Whether the class itself (not a parent) declares a field with `humpback.settings.setting`."""
    own = inspect.get_annotations(cls)
    return any(name in own and isinstance(f.json_schema_extra, dict) and "cli" in f.json_schema_extra
               for name, f in cls.model_fields.items())


def test_every_settings_model_is_listed() -> None:
    found = set()
    for package in ("services", "client", "trainer", "humpback"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__
                        and _declares_settings(obj)):
                    found.add(f"{module.__name__}:{name}")
    assert found == set(SETTINGS)


def test_the_settings_table_in_the_docs_is_current() -> None:
    text = (REPO / "docs" / "contracts.md").read_text(encoding="utf-8")
    block = text[text.index("\n", text.index(TABLE_START)) + 1:text.index(TABLE_END)]
    assert block == settings_table(settings_models()), "run `humpback settings --write docs/contracts.md`"
