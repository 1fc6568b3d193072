"""The framework: config, scales, plan, storage, markers, runner, executors, sweeps."""
