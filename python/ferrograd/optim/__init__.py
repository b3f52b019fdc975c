"""SPAM and Stable-SPAM: Adam with momentum resets, spike clipping and sparse momentum."""

from .spam import SPAM, StableSPAM

__all__ = ["SPAM", "StableSPAM"]
