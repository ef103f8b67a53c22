"""edittuner: split-phase LoRA training for Qwen-Image-Edit (2509 / 2511) on top of DiffSynth-Studio."""

__version__ = "0.1.0"
