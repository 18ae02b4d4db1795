"""ReSSL: Relational Self-Supervised Learning with Weak Augmentation (Zheng et al., NeurIPS 2021).

The names below load on first use (PEP 562), so that ``ressl --help`` and the command line's one-line errors do not
wait seconds for torch to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "Config": "config", "ConfigError": "config", "relational_loss": "loss", "Encoder": "model", "ReSSL": "model",
    "build_backbone": "model", "build_model": "model", "EmbeddingQueue": "queue", "cosine_lr": "schedule",
    "ema_momentum": "schedule",
}
__all__ = [
    "Config", "ConfigError", "EmbeddingQueue", "Encoder", "ReSSL", "build_backbone", "build_model",
    "cosine_lr", "ema_momentum", "relational_loss",
]

if TYPE_CHECKING:
    from ressl.config import Config, ConfigError
    from ressl.loss import relational_loss
    from ressl.model import Encoder, ReSSL, build_backbone, build_model
    from ressl.queue import EmbeddingQueue
    from ressl.schedule import cosine_lr, ema_momentum


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ressl' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ressl.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
