"""Metric names shared by the trainable, the searcher, the export and the tests."""

VAL_ACC = "val_acc"
VAL_LOSS = "val_loss"
TRAIN_LOSS = "train_loss"
EPOCH = "epoch"
COST = "cost"  # compute spent so far, in full fine-tuning epochs (tuning.lib.cost): ASHA's fidelity
IMAGES_PER_S = "images_per_s"
LR_BACKBONE = "lr_backbone"  # the epoch's learning rates; absent: the backbone is frozen
LR_HEAD = "lr_head"
TEST_ACC = "test_acc"
NODE_ID = "node_id"  # the Ray node a result came from (a string, not plotted)

# The searcher, ASHA and the export all rank trials by this, higher is better.
OBJECTIVE = VAL_ACC
MODE = "max"
