"""Getting raw data onto disk: dataset sources, resumable downloads with retry, the URL trust policy, and the bundled
offline sample."""
