from experiments.base import Experiment

# d2l's hotdog (2,000 train / 2,000 test photos; a fifth of train is held out as val). d2l trains
# 5 epochs, so ASHA's rungs at 1 and 3 still cut weak trials; 1,600 training images at 224 px take
# ~3 CPU-minutes an epoch, at 160 px half that, which keeps 32 trials to an overnight CPU run.
# The recipe is d2l's: SGD lr 5e-5, head 10x, weight decay 1e-3 (batch 128 -> 64, the largest searched).
HOTDOG = Experiment(
    name="hotdog",
    dataset="hotdog",
    epochs=5,
    image_size=160,
    recipe={"optimizer": "sgd", "lr": 5e-5, "head_lr_mult": 10.0, "freeze_depth": 0, "batch_size": 64,
            "weight_decay": 1e-3},
)
