"""The scenarios a worker can run, by name."""

from __future__ import annotations

from loadtest.scenarios.base import Scenario
from loadtest.scenarios.calls import Calls
from loadtest.scenarios.chat import Chat
from loadtest.scenarios.connect import Connect
from loadtest.scenarios.fanout import Fanout
from loadtest.scenarios.idle import Idle

__all__ = ["SCENARIO_CLASSES", "Scenario"]

SCENARIO_CLASSES: dict[str, type[Scenario]] = {
    cls.name: cls for cls in (Fanout, Chat, Calls, Connect, Idle)
}
