"""Every MLflow tag name commlab writes or reads (`commlab.*`) is spelled once, in
`commlab/tags.py`; other modules use its constants."""

from __future__ import annotations

import ast
import re

from tests.test_layering import Module, package_modules

TAG = re.compile(r"^commlab\.[a-z_]")
TAGS_MODULE = "commlab.tags"


def tag_literals(modules: list[Module]) -> dict[str, list[str]]:
    """`commlab.*` string literals that are not module names -> modules that spell them."""
    names = {m.name for m in modules}
    found: dict[str, list[str]] = {}
    for m in modules:
        for node in ast.walk(ast.parse(m.text)):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = node.value
            if TAG.match(text) and text not in names and " " not in text:
                found.setdefault(text, []).append(m.name)
    return found


def misplaced(modules: list[Module]) -> list[str]:
    return sorted(
        f"{tag} in {where}"
        for tag, where in tag_literals(modules).items()
        if set(where) != {TAGS_MODULE} or len(where) != 1
    )


def test_each_tag_name_is_spelled_once_in_tags_py():
    modules = package_modules()
    assert tag_literals(modules), "no tag names found: the scan is broken"
    assert misplaced(modules) == []


def test_a_tag_spelled_elsewhere_is_caught():
    modules = [
        *package_modules(),
        Module("commlab.sweep.x", False, 'TAG = "commlab.best_trial_id"\nMOD = "commlab.cli"\n'),
    ]
    assert misplaced(modules) == ["commlab.best_trial_id in ['commlab.tags', 'commlab.sweep.x']"]
