"""Training: loss, optimizer, the jitted step, Orbax checkpoints, metrics and the loop."""
