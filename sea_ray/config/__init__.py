"""The typed job configs, in one package: their classes, the rules across their fields, and the
one validation pass that reads a config.

- :mod:`sea_ray.config.schema`: every section and job config class, the path markers and
  :data:`~sea_ray.config.schema.JOBS` (job name -> config class);
- :mod:`sea_ray.config.rules`: the rules across fields (:func:`~sea_ray.config.rules.cross_field_problems`);
- :mod:`sea_ray.config.loading`: YAML, dotted overrides, preset expansion, :func:`~sea_ray.config.loading.validate`,
  :func:`~sea_ray.config.loading.load_config` and the walk over path fields.

Importing this package imports none of them: import the module you need.
"""
