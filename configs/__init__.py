"""Experiment configs: `python experiments/run.py --config=configs/NAME.py[:PRESET]`. A package, so that
a config file builds on another as `from configs import rto_tldr`. Each file has `get_config(preset)`
and a `PRESETS` tuple (the first is the default), which `experiments/run.py --help` lists."""
