"""Item features and item graphs: text embeddings, image fetching and CNN encoding in shards, the authors' 2014 image
features, and exact or approximate kNN graphs."""
