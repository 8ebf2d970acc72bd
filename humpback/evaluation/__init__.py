"""`humpback eval`: IFEval accuracy, pairwise win rate on AlpacaEval prompts, held-out seed NLL.

Every evaluation talks to OpenAI-compatible endpoints only (vLLM here, any hosted API elsewhere), so
the model under test, the baseline and the judge are each just a URL and a model name.
"""
