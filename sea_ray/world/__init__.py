"""The synthetic world, in one package: its generator, its trained backbones, its oracle labels and
the label audit against its ground truth.

- :mod:`sea_ray.world.generator`: scenes, images, captions, questions and exact per-patch ground
  truth (pure: numpy, PIL);
- :mod:`sea_ray.world.oracle`: a labels dataset built from the ground truth, in the labels job's schema;
- :mod:`sea_ray.world.audit`: the label audit, the labeler's top-1 label against the ground truth;
- :mod:`sea_ray.world.backbones`: the recipe of the shipped world CLIP and LLM
  (weights in ``sea_ray/assets/world``).

Importing this package imports none of them (no torch, no Ray): import the module you need.
"""
