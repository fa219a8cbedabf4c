"""Ray job entry point: ``sea-ray tune``, search the SEA and adapter hyperparameters with Ray Tune + Optuna.

Run it on a Ray cluster (from the repository root; the working dir is uploaded)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m workflows.tune --config workflows/configs/tiny_tune.yaml

or ``sea-ray submit --address http://127.0.0.1:8265 --wait -- tune --config workflows/configs/tiny_tune.yaml``
(credentials passed by name, config validated before upload), or here, on a local Ray::

    python -m workflows.tune --config workflows/configs/tiny_tune.yaml [dotted.key=value ...]
"""

import sys

from sea_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
