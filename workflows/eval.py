"""Ray job entry point: ``sea-ray eval``, evaluate a checkpoint: alignment diagnostics and QA accuracy.

Run it on a Ray cluster (from the repository root; the working dir is uploaded)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m workflows.eval --config workflows/configs/tiny_eval.yaml

or ``sea-ray submit --address http://127.0.0.1:8265 --wait -- eval --config workflows/configs/tiny_eval.yaml``
(credentials passed by name, config validated before upload), or here, on a local Ray::

    python -m workflows.eval --config workflows/configs/tiny_eval.yaml [dotted.key=value ...]
"""

import sys

from sea_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
