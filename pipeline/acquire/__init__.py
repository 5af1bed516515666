"""Getting raw data onto disk: dataset sources, resumable downloads with retry, URL trust policy, offline sample."""
