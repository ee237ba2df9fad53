"""Engine side: training and evaluating one configuration (no Ray, no YAML): ``TrainingRun``,
``train_one_epoch``, ``evaluate``, losses, metrics, checkpoints, the feature cache, explanations."""
