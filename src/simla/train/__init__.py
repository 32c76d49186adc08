"""Training utilities: optimiser construction, gradient norms and step-indexed schedules."""
