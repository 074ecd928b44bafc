"""SafetyDPO library: safety experts (LoRA), Diffusion-DPO training, Co-Merge, evaluation, demo world.

This package never imports ComfyUI; the node layer (``nodes*.py`` beside it) does the converting.
"""

__version__ = "0.1.0"
