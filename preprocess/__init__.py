"""The preprocessing job (SPEC §6): raw audio (local dir or s3://) → VAE latents in WebDataset shards.

Small steps, each callable without Ray: ``sources`` (listing, captions, shard plan) → ``audio`` (decode, 44.1 kHz
stereo, segments) → ``augment`` (seeded audiomentations copies) → ``encode`` (the VAE, batched) → ``worker`` (one
shard end to end, written through ``pipeline.shards``) → ``job`` (plan, run shards on Ray actors or in process,
index) → ``cli`` (``longplay preprocess``).
"""
