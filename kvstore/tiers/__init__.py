"""Storage tiers: each holds KVC1 objects under ChunkKeys within a byte capacity."""
