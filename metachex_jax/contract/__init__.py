"""What a model promises, without its code: the pixels it is fed (`pixels.py`: the pixel contract), its named
outputs (`outputs.py`) and the card of a model directory (`card.py`). An exported model runs from these alone."""
