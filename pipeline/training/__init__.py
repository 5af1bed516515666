"""Training and scoring models on the split data: the trainer with checkpoints and resume, negative sampling,
full-ranking evaluation and top-k recommendation."""
