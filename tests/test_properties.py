"""Property tests over every parser and public method with random and hostile values
(see ``properties``), bounded for CI: ``QUOTAGUARD_PROPERTY_EXAMPLES`` examples each
(default 150). ``python benches/fuzz.py --minutes N`` runs the same properties longer."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from properties import PROPERTIES

EXAMPLES = int(os.environ.get("QUOTAGUARD_PROPERTY_EXAMPLES", "150"))

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_property(name: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUOTAGUARD_LEDGER", raising=False)
    prop: Callable[[st.DataObject], str] = PROPERTIES[name]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        prop(data)

    run()
