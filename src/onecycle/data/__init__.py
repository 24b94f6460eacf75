"""Datasets, from the source to the batches a model sees: the dataset records (``catalog``), fetching
(``fetchers``), the fetched folder's format (``store``), image decoding behind a guard (``images``),
augmentations (``transforms``) and seeded, resumable loaders (``loaders``). May import ``core`` only."""
