"""solace: post-train text-to-image flow-matching models with RL on their own self-confidence."""

__version__ = "0.1.0"
