"""Ray job entry point: ``sea-ray pipeline``, the whole chain: world/import -> labels -> [tune] -> align -> instruct -> eval.

Run it on a Ray cluster (from the repository root; the working dir is uploaded)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m workflows.pipeline --config workflows/configs/tiny_pipeline.yaml

or ``sea-ray submit --address http://127.0.0.1:8265 --wait -- pipeline --config workflows/configs/tiny_pipeline.yaml``
(credentials passed by name, config validated before upload), or here, on a local Ray::

    python -m workflows.pipeline --config workflows/configs/tiny_pipeline.yaml [dotted.key=value ...]
"""

import sys

from sea_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
