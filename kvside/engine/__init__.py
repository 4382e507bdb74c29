"""The engine: the only code that touches a llama_context."""

from kvside.engine.core import EngineConfig
from kvside.engine.engine import Engine
from kvside.engine.ledger import Ledger
from kvside.engine.sampling import SamplingParams
from kvside.engine.stream import Completion, Event, Stream

__all__ = ["Engine", "EngineConfig", "Ledger", "SamplingParams", "Completion", "Event", "Stream"]
