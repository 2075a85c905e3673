"""Plan -> weights: parent tensors read and blended, assembled into a model in memory, exported to
sharded safetensors, or a checkpoint slimmed."""
