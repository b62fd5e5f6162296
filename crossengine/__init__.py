"""crossengine: run one model on several inference engines and localise, token by token,
where their log-probabilities disagree.

    crossengine run experiments/quickstart.yaml
"""

__version__ = "0.1.0"
