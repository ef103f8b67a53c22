"""The editing app: `python app_gradio.py [--port 7999] [--host 127.0.0.1] [--auth user:pass] [--share]`.

Model flags as `edittuner sample` (--model_dir, default the built-in tiny model; --model_version; resize flags);
LoRAs are listed from --train_dir (default train/). The logic lives in edittuner/app.py.
"""

import sys

from edittuner.app import main

if __name__ == "__main__":
    sys.exit(main())
