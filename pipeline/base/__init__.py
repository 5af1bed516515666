"""The pipeline's lowest layer: errors, files, line readers, dataset formats, config, store, devices.

Why a package of its own: these modules know nothing of stages, so every stage package may import them and they import
no stage package; keeping them apart makes ``pipeline/`` read bottom-up (base, then the stage packages, then the table
and its runner)."""
