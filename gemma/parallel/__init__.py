"""Scale-out: device meshes, parameter/cache shardings and placement, the per-device memory
planner, multi-host start-up, host-memory per-layer embeddings."""
