"""ReSSL: Relational Self-Supervised Learning with Weak Augmentation (Zheng et al., NeurIPS 2021)."""

from ressl.config import Config, ConfigError
from ressl.loss import relational_loss
from ressl.model import Encoder, ReSSL, build_backbone, build_model
from ressl.queue import EmbeddingQueue
from ressl.schedule import cosine_lr, ema_momentum

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "EmbeddingQueue", "Encoder", "ReSSL", "build_backbone", "build_model",
    "cosine_lr", "ema_momentum", "relational_loss",
]
