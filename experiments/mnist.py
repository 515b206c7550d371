from experiments.base import Experiment

# MNIST: 60,000 gray 28 px digits (a tenth held out as val) and the official 10,000 test digits.
# - One channel: the stem's RGB kernels are summed (gray_input "sum", tuning.lib.model), keeping the
#   pretrained filters; "repeat" (seed 000's expand to 3 channels) is the alternative.
# - 64 px, not seed 001's 224 nor seed 000's 28: the best val accuracy per CPU-second of 32, 64 and
#   112 px on a digits proxy (benchmarks/README.md, "By hand").
# - 3 epochs: seed 000 reaches 0.989 after 2, and an epoch is 54,000 images; ASHA still cuts at 1.
# - Digits must not be mirrored, and a crop must keep most of the digit.
# - The recipe is seeds 000/001's Adam at 1e-3, all layers trained, no weight decay, from a fresh
#   random head as the seeds have it: from the probe's head (LP-FT) it scored lower on the digits
#   proxy (benchmarks/README.md, anytime).
MNIST = Experiment(
    name="mnist",
    dataset="mnist",
    image_size=64,
    image_mode="L",
    epochs=3,
    hflip=False,
    crop_scale=(0.6, 1.0),
    recipe={"optimizer": "adam", "lr": 1e-3, "head_lr_mult": 1.0, "freeze_depth": 0, "batch_size": 64,
            "weight_decay": 1e-6},
    recipe_head="random",
)
