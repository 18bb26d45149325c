"""The documents' published JSON Schemas (docs/schemas/) are the models' own, and the README's
field lists ("Reading the results") name exactly the fields the schemas define.

The README lists each file's fields as bullets: the backticked names before a bullet's first
colon are top-level fields; the first `{a, b, ...}` group after them lists that field's own
fields (for an array, each element's); any further group names fields found deeper in it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from confide.server.results import SCHEMA_COMMAND, SCHEMAS, json_schema

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "## Reading the results"
NAME = re.compile(r"`([a-z0-9_]+)`")
GROUP = re.compile(r"`\{([a-z0-9_,\s]+)\}`")


@pytest.mark.parametrize("file_name", sorted(SCHEMAS))
def test_the_committed_schema_is_the_models(file_name: str) -> None:
    committed = ROOT / "docs" / "schemas" / file_name
    current = committed.read_text() if committed.is_file() else None
    assert current == json_schema(file_name), (
        f"docs/schemas/{file_name} is not the schema of its model; regenerate it: "
        f"`.venv/bin/{SCHEMA_COMMAND}`"
    )


def _bullets(file_name: str) -> list[str]:
    """The bullets under the line that opens with `file_name` in the README section."""
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"`{file_name}`"))
    bullets: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("- "):
            bullets.append(line[2:])
        elif line.startswith("  ") and bullets:
            bullets[-1] += " " + line.strip()
        elif bullets:  # the blank line after the list
            break
    return bullets


def _documented(file_name: str) -> list[tuple[list[str], list[set[str]]]]:
    """(top-level names, field groups) of each bullet."""
    documented = []
    for bullet in _bullets(file_name):
        head, _, rest = bullet.partition(": ")
        groups = [{name.strip() for name in group.split(",")} for group in GROUP.findall(rest)]
        documented.append((NAME.findall(head), groups))
    return documented


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> list[dict[str, Any]]:
    """The object schemas `node` may be: through $ref, unions and array items."""
    if "$ref" in node:
        return _resolve(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[1]])
    for union in ("anyOf", "oneOf"):
        if union in node:
            return [found for option in node[union] for found in _resolve(schema, option)]
    if node.get("type") == "array":
        return _resolve(schema, node["items"])
    return [node] if "properties" in node else []


def _fields(schema: dict[str, Any], node: dict[str, Any]) -> set[str]:
    return {name for option in _resolve(schema, node) for name in option["properties"]}


def _deep_fields(
    schema: dict[str, Any], node: dict[str, Any], seen: frozenset = frozenset()
) -> set[str]:
    names = set()
    for option in _resolve(schema, node):
        for name, child in option["properties"].items():
            names.add(name)
            if id(child) not in seen:
                names |= _deep_fields(schema, child, seen | {id(child)})
    return names


@pytest.mark.parametrize("file_name", sorted(SCHEMAS))
def test_the_readme_documents_every_top_level_field_and_no_other(file_name: str) -> None:
    schema = SCHEMAS[file_name].model_json_schema()
    documented = [name for names, _ in _documented(file_name) for name in names]
    assert len(documented) == len(set(documented)), f"{file_name}: a field listed twice"
    assert set(documented) == _fields(schema, schema), (
        f"README.md, {SECTION}, {file_name}: documented {sorted(documented)}, "
        f"the schema has {sorted(_fields(schema, schema))}"
    )


@pytest.mark.parametrize("file_name", sorted(SCHEMAS))
def test_the_readme_field_lists_are_the_schemas(file_name: str) -> None:
    schema = SCHEMAS[file_name].model_json_schema()
    properties = {
        name: child
        for option in _resolve(schema, schema)
        for name, child in option["properties"].items()
    }
    checked = 0
    for names, groups in _documented(file_name):
        if not groups:
            continue
        (name,) = names  # a field list belongs to one field
        own, *deeper = groups
        assert own == _fields(schema, properties[name]), (
            f"README.md, {file_name}: `{name}` lists {sorted(own)}, the schema has "
            f"{sorted(_fields(schema, properties[name]))}"
        )
        for group in deeper:
            assert group <= _deep_fields(schema, properties[name]), (
                f"README.md, {file_name}: `{name}` names {sorted(group)}, not all in its schema"
            )
        checked += 1
    expected = {"results.json": 7, "privacy.json": 3, "partitions.json": 0, "model.json": 6}[
        file_name
    ]
    assert checked == expected  # the parser found the lists it should check
