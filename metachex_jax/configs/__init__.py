"""The recipes (`pretrain.py`, `chexnet.py`, `transfer.py`, `linear_probe.py`, `finetune.py`: each a
`get_config(arg)` returning a whole ml_collections ConfigDict) and their rules (`config_lib.py`). The repository's
`configs/*.py` are the paths users pass to `--config`; each imports its recipe from here."""
