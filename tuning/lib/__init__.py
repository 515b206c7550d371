"""The library beneath the commands: data (decoding, the decoded-image store, transforms), the
networks (backbones, the fine-tuning model, its memory footprint), the frozen-feature cache and
the checkpoint format. Nothing here imports `tuning.app` or the commands."""
