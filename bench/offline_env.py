"""The environment every benchmark sets before importing Ray or transformers: offline, no usage
stats, Ray bound to loopback, Ray's progress bars, metrics and preemption watcher off (what the
test suite sets too). Import it first: ``import offline_env  # noqa: F401`` from a script in bench/."""

import os
import sys
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "AWS_EC2_METADATA_DISABLED": "true",
                   "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_METRICS_ENABLED": "0",
                   "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sea_ray
