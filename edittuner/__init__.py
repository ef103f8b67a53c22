"""edittuner: split-phase LoRA training for instruction-based image-edit models (model families in
``edittuner.families``: Qwen-Image-Edit 2508 / 2509 / 2511 on DiffSynth-Studio)."""

__version__ = "0.1.0"

import logging as _logging

# torchao (imported by peft when installed) registers enums with torch's pytree the way torch 2.14 deprecates;
# the two-line warning at every start says nothing a user can act on.
_logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())
