"""The algorithm as pure functions of arrays: objectives (losses.py) and their metrics, advantage
estimators, subsentence segments, chunked log-probs, and the training batch (train_batch.py).
It imports no model."""
