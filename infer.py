"""Emotion predictions for audio files and live microphone speech; see ``--help``."""

import sys

from ser_pipeline.infer_cli import main

if __name__ == "__main__":
    sys.exit(main())
