"""gradwatch: vanishing and exploding gradients, made visible, explained, predicted and fixed."""

from gradwatch.errors import GradwatchError

__version__ = "0.1.0"
