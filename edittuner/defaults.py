"""Defaults that both the light command line and the heavy modules need, stated once (no heavy imports here)."""

SAVE_EVERY = 250          # checkpoint interval of `edittuner train`; the launchers pass SAVE_EVERY only when set
DEFAULT_NEGATIVE_PROMPT = " "   # the CFG negative of previews and `sample` (what the engine's Qwen-Image-Edit examples pass)
