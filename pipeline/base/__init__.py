"""The pipeline's lowest layer: errors, files, line readers, dataset formats, config, store, devices. They know nothing
of stages, so every stage package may import them and they import none: ``pipeline/`` reads bottom-up (base, the stage
packages, then the table and its runner)."""
