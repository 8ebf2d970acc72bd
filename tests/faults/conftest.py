"""The fault suite reuses the trainer tests' small training file."""

from tests.trainer.conftest import train_file  # noqa: F401  (a fixture, found by name)
