"""Study logic over Optuna: the objective, sampler and pruner, creating and warm-starting a study,
ranking its trials, reading a stored study back, confirming finalists and reporting."""
