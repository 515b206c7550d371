"""Ray Tune trainables."""
