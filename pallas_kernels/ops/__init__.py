"""A folder per op: api (validation + dispatch), reference, kernels, config, specs, tuned tables."""
