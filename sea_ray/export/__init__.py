"""Export of trained models to standard formats: a sea_ray vision tower as a Hugging Face vision
tower, image processor and feature-selection strategy for ``transformers.LlavaForConditionalGeneration``
(``sea_ray.export.towers``). This package's ``__init__`` imports nothing."""
