from experiments.base import Experiment

# Five Pokemon, ~1,168 images split 60/20/20 (~700 train): hymenoptera's scale, so the defaults as they are.
POKEMON = Experiment(name="pokemon", dataset="pokemon")
