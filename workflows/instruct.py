"""Ray job entry point: ``sea-ray instruct``, stage 2, instruction tuning with Ray Train.

Run it on a Ray cluster (from the repository root; the working dir is uploaded)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m workflows.instruct --config workflows/configs/tiny_instruct.yaml

or ``sea-ray submit --address http://127.0.0.1:8265 --wait -- instruct --config workflows/configs/tiny_instruct.yaml``
(credentials passed by name, config validated before upload), or here, on a local Ray::

    python -m workflows.instruct --config workflows/configs/tiny_instruct.yaml [dotted.key=value ...]
"""

import sys

from sea_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["instruct", *sys.argv[1:]]))
