"""humpback: instruction backtranslation as inference-serving microservices."""

__version__ = "0.1.0"
