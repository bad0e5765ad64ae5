"""Other libraries' files and weights: torch's pickle files read without torch (`torch_pickle.py`), torchvision
DenseNet state dicts -> our DenseNet and backbone directories (`convert.py`), torchxrayvision's chest X-ray models
-> model directories (`torchxrayvision.py`)."""
