from experiments.base import Experiment

# The PyTorch transfer-learning tutorial's ants/bees (244 train / 153 val): the defaults as they are.
HYMENOPTERA = Experiment(name="hymenoptera", dataset="hymenoptera")
