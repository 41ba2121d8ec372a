"""The algorithm as pure functions of arrays: objectives (losses.py) and their metrics, advantage
estimators, subsentence segments, chunked log-probs, the training batch (train_batch.py) and its
padding-free layout (packing.py).
It imports no model."""
