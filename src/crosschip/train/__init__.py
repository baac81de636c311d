"""Training on any torch device: `train(TrainConfig, Reporter) -> TrainResult`."""
