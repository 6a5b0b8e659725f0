"""The Hub side of a run: access checks and the model card."""

from __future__ import annotations

from .access import check_hub_access
from .card import model_card_template, render_model_card

__all__ = [
    "check_hub_access",
    "model_card_template",
    "render_model_card",
]
