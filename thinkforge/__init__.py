"""thinkforge: fine-tune reasoning models on Ray and serve them with budget forcing."""

__version__ = "0.1.0"
