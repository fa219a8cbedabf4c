"""Ray job entry point: ``sea-ray benchmark``, lmms-eval benchmarks of exported models, side by side.

Run it on a Ray cluster (from the repository root; the working dir is uploaded)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m workflows.benchmark --config workflows/configs/tiny_benchmark.yaml

or ``sea-ray submit --address http://127.0.0.1:8265 --wait -- benchmark --config workflows/configs/tiny_benchmark.yaml``
(credentials passed by name, config validated before upload), or here, on a local Ray::

    python -m workflows.benchmark --config workflows/configs/tiny_benchmark.yaml [dotted.key=value ...]
"""

import sys

from sea_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
