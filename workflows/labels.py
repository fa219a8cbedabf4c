"""Ray job entry point: ``sea-ray labels``, precompute CLIP patch labels with Ray Data.

Run it on a Ray cluster (from the repository root; the working dir is uploaded)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m workflows.labels --config workflows/configs/tiny_labels.yaml

or ``sea-ray submit --address http://127.0.0.1:8265 --wait -- labels --config workflows/configs/tiny_labels.yaml``
(credentials passed by name, config validated before upload), or here, on a local Ray::

    python -m workflows.labels --config workflows/configs/tiny_labels.yaml [dotted.key=value ...]
"""

import sys

from sea_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["labels", *sys.argv[1:]]))
