"""Fixtures shared by the institution's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.client.institution import InstitutionConfig, InstitutionDir


@pytest.fixture
def institution(tmp_path: Path) -> Path:
    """A deployed institution's folder (tiny data) that has never trained."""
    data = tmp_path / "data.csv"
    data.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    folder = tmp_path / "hospital-a"
    folder.mkdir()
    InstitutionDir(folder).save(
        InstitutionConfig(
            name="hospital-a",
            node_id=7,
            superlink="127.0.0.1:1",
            enrollment="127.0.0.1:2",
            data=data,
            declared_examples=18,
        )
    )
    return folder
