"""What one search is: the defaults every experiment starts from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Experiment:
    name: str
    dataset: str  # a name in tuning.lib.data.sources.DATASETS
    backbone: str = "efficientnet_lite0"  # the only ImageNet weights to be had offline
    search_space: str = "finetune"
    samples: int = 32
    # Fine-tuning a few hundred images converges in a handful of epochs; 8 gives the survivors room
    # to settle. ASHA judges trials by compute spent, in full fine-tuning epochs (tuning.lib.cost):
    # rungs at 1/3, 1 and 3 of them, keeping the best third at each.
    epochs: int = 8
    grace_period: float = 1 / 3
    reduction_factor: int = 3
    image_size: int = 224
    image_mode: str = "RGB"  # "L": one-channel data (MNIST); the first convolution is adapted
    gray_input: str = "sum"  # for "L": "sum" the RGB kernels into one, or "repeat" gray 3x (tuning.lib.model)
    # Training views, as the seeds' RandomResizedCrop + RandomHorizontalFlip; digits must not flip.
    # With hflip the probe also fits the mirror images, and the final model averages each image
    # with its mirror (tuning.app.final_model.mirror).
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    # Distinct training views (crop + flip) per image: epoch e trains on view e mod train_views
    # (data echoing, Choi et al. 2019), in its own shuffled order. A frozen prefix's outputs are
    # computed once per view for every trial at that depth, so this bounds that one-time cost and
    # the feature cache's disk; a head-only trial's epoch is nearly all its view's features
    # (benchmarks/README.md, anytime). Epochs past the fourth are rare but for cheap deep trials.
    # None: a new view every epoch.
    train_views: int | None = 4
    per_class: int | None = None  # keep at most this many images per class and split (smoke tests)
    seed: int = 0
    pretrained: bool = True
    # The seeds' hand recipe, evaluated first so the search never ends worse than the tutorial:
    # the PyTorch tutorial's SGD at 1e-3, no weight decay (1e-6, the searched range's "none").
    recipe: dict[str, Any] = field(
        default_factory=lambda: {"optimizer": "sgd", "lr": 1e-3, "head_lr_mult": 10.0, "freeze_depth": 0,
                                 "batch_size": 32, "weight_decay": 1e-6}
    )
    # The head the recipe starts from: the linear probe's, as every other trial's (LP-FT), or
    # "random", a fresh one as the seeds have it. Hymenoptera's SGD recipe ends sooner and no worse
    # from the probe's head (anytime-recipe-random-head.json); MNIST's Adam recipe is the other way
    # round (experiments/mnist.py).
    recipe_head: str = "probe"
    # Every trial stops on a plateau: once this many whole epochs passed without a new best of its
    # own, even while that best leads the search (tuning.app.asha): the seeds' recipe peaks at its
    # first report on hymenoptera and then only holds a slot. 3, not 2, lets a trial with a late best
    # reach it (benchmarks/README.md, anytime).
    patience: int = 3
    # ... or sooner, once a trial's epochs since its best cost this many full fine-tuning epochs
    # (tuning.lib.cost): a plateau is judged by compute spent, as ASHA's rungs are. At 1.5 a full
    # fine-tune stops after two stale epochs, a depth-4 or 5 trial (about 0.6 per epoch) after
    # three, as late bests came from such trials (benchmarks/README.md, anytime).
    patience_cost: float = 1.5

    def __post_init__(self) -> None:
        if self.recipe_head not in ("probe", "random"):
            raise ValueError(f"recipe_head must be 'probe' or 'random', not {self.recipe_head!r}")
        if self.train_views is not None and self.train_views < 1:
            raise ValueError(f"train_views must be at least 1 (or None), not {self.train_views}")
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, not {self.patience}")
        if self.patience_cost <= 0:
            raise ValueError(f"patience_cost must be positive, not {self.patience_cost}")

    def is_recipe(self, config: dict[str, Any]) -> bool:
        """Whether a trial's configuration is the seeds' recipe, which ASHA lets run while it improves."""
        return all(config.get(name) == value for name, value in self.recipe.items())
