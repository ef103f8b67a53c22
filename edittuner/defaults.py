"""Defaults that both the light command line and the heavy modules need, stated once (no heavy imports here)."""

SAVE_EVERY = 250          # checkpoint interval of `edittuner train`; the launchers pass SAVE_EVERY only when set
