"""Rewards: the self-confidence reward, external rewards by name, their mixture and prompt edits."""

# solace's own registered rewards: importing any module of this package registers them (each keeps its heavy
# imports inside its factory); the plugins' rewards register when the registry loads the plugins
from solace.rewards import control, external  # noqa: F401
