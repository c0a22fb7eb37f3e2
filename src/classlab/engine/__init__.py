"""The one training loop and what it needs: devices, seeding, checkpoints, schedules."""
from classlab.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: F401
from classlab.engine.device import autocast, pick_device  # noqa: F401
from classlab.engine.trainer import Trainer, TrainConfig, predict_logits  # noqa: F401
