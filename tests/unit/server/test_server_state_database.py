"""The coordinator's database opens when another process creates its tables at the same time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Table, create_engine, event, inspect

from confide.server.state import Base, KeyRotationRow, open_database


@pytest.fixture
def rival_creates_table_first(tmp_path: Path) -> Iterator[str]:
    """Just before this process creates `key_rotations`, another connection creates it: the
    interleaving that made two audit writers fail in CI ("table key_rotations already exists")."""
    url = f"sqlite:///{tmp_path}/state.db"
    rival = create_engine(url)
    table: Table = KeyRotationRow.__table__  # type: ignore[assignment]

    raced: list[bool] = []

    def create_it_first(target: Table, connection: Connection, **_: object) -> None:
        if raced:  # the rival's own CREATE fires this event too
            return
        raced.append(True)
        with rival.begin() as other:
            target.create(other)

    event.listen(table, "before_create", create_it_first)
    try:
        yield url
    finally:
        event.remove(table, "before_create", create_it_first)
        rival.dispose()


def test_tables_created_by_another_process_meanwhile_are_not_an_error(
    rival_creates_table_first: str,
) -> None:
    engine = open_database(rival_creates_table_first)

    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables)
    engine.dispose()


def test_a_file_that_is_not_a_database_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"not a database" * 100)

    with pytest.raises(Exception, match="not a database"):
        open_database(f"sqlite:///{path}")
