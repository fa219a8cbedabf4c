"""Ray job entry points, one per job, and the YAML recipes in ``configs/``.

Each module is a thin ``python -m workflows.<job> --config FILE [k=v ...]`` wrapper around
``sea-ray <job>``, so the same command runs locally, as ``ray job submit ... -- python -m
workflows.<job> ...``, or through ``sea-ray submit ... -- <job> ...``. Nothing runs at import.
"""
