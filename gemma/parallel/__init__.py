"""Scale-out: device meshes and parameter/cache shardings, multi-host start-up, host-memory
per-layer embeddings."""
